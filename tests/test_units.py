"""The core's shape: the unit table, the adapter protocol, the update log, the estimator, and
several metrics from one evaluation pass."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, token_batch
from transformers import GPT2Config, GPT2LMHeadModel

import zoruntime
from zoruntime.models import ADAPTERS, adapter_for
from zoruntime.runtime import Stage, Unit, UnitTable, uniform_units
from zoruntime.zo.estimator import TwoSidedEstimator
from zoruntime.zo.log import UpdateLog
from zoruntime.zo.reference import ReferenceZO
from zoruntime.zo.update import PendingUpdate

PACKAGE = Path(__file__).resolve().parent.parent / "zoruntime"


def test_the_opt_unit_table_is_embed_blocks_head_over_one_group_per_block(variant: str) -> None:
    adapter = adapter_for(tiny_model(variant, num_hidden_layers=3))
    units = list(adapter.units)
    assert [u.name for u in units] == ["embed", "block.0", "block.1", "block.2", "head"]
    assert [u.stage for u in units] == [Stage.EMBED, Stage.BLOCK, Stage.BLOCK, Stage.BLOCK, Stage.HEAD]
    assert [u.group for u in units] == [0, 1, 2, 3, 0]
    assert [u.streamable for u in units] == [False, True, True, True, False]
    assert {units[0].group_name, units[-1].group_name} == {"embed_head"}
    layouts = [layout for layout, _ in adapter.groups()]
    assert [layout.group for layout in layouts] == [0, 1, 2, 3]
    assert all(u.nbytes == layouts[u.group].nbytes for u in units)
    assert [u.name for u in adapter.units.kept] == ["embed"]
    assert [u.index for u in adapter.units.streamable] == [0, 1, 2]


def test_a_unit_table_refuses_what_the_runtime_cannot_run() -> None:
    embed, head = uniform_units(1).units[0], uniform_units(1).units[-1]
    block = Unit("block.0", 1, "block.0", Stage.BLOCK, 0, 8, True)
    with pytest.raises(ValueError, match="unit names must be unique"):
        UnitTable((embed, block, block, head))
    with pytest.raises(ValueError, match="an embed unit first and a head unit last"):
        UnitTable((block, head))
    shared = Unit("block.1", 1, "block.0", Stage.BLOCK, 1, 8, True)
    with pytest.raises(ValueError, match=r"group block\.0 is used by several units and cannot be streamed"):
        UnitTable((embed, block, shared, head))


def test_adapter_for_names_the_supported_model_types() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    supported = ", ".join(sorted(ADAPTERS))
    message = rf"no adapter for GPT2LMHeadModel \(model_type 'gpt2'\); supported model types: {supported} \("
    with pytest.raises(TypeError, match=message):
        adapter_for(gpt2)
    assert {"llama", "mistral", "opt", "qwen2", "qwen3", "mixtral", "gemma"} <= set(ADAPTERS)


def test_no_module_outside_models_imports_a_model_family() -> None:
    families = {f"models.{name}" for name in ADAPTERS}
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "models":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not any(node.module.endswith(family) for family in families), (path, node.module)


@pytest.mark.asyncio
async def test_the_users_requires_grad_flags_are_left_as_they_were() -> None:
    model = tiny_model(num_hidden_layers=2)
    for name, param in model.named_parameters():
        param.requires_grad_("layers.0" not in name)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    layout = adapter_for(model).groups()[1][0]
    assert {s.trainable for s in layout.slices} == {False}  # block 0 is frozen, and its slices know
    async with zoruntime.Runtime(model, zoruntime.ZOSGD(lr=1e-3)) as rt:
        await rt.step(token_batch(model.config))
    ReferenceZO(model, zoruntime.ZOSGD(lr=1e-3)).step(token_batch(model.config))
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


def _update(step: int) -> PendingUpdate:
    return PendingUpdate.from_gradient(step, seed=step, lr=0.1, weight_decay=0.0, grad=torch.tensor(1.0))


def test_the_update_log_lists_what_a_copy_missed_oldest_first() -> None:
    log = UpdateLog()
    for step in (3, 4, 6):
        log.add(_update(step))
    assert [u.step for u in log.missing(-1)] == [3, 4, 6]
    assert [u.step for u in log.missing(4)] == [6]
    assert log.missing(6) == []
    with pytest.raises(ValueError, match="update of step 5 added after step 6"):
        log.add(_update(5))
    log.settle(through=4)
    assert [u.step for u in log.missing(-1)] == [6]
    log.settle(through=6)
    assert len(log) == 0 and log.missing(-1) == []


def test_the_two_sided_estimator_probes_plus_and_minus_eps() -> None:
    estimator = TwoSidedEstimator(eps=1e-3)
    assert [(p.direction, p.scale) for p in estimator.probes()] == [(0, 1e-3), (0, -1e-3)]
    (g,) = estimator.projected_gradients([torch.tensor(2.5), torch.tensor(2.0)])
    assert g.item() == pytest.approx(0.5 / 2e-3)


@pytest.mark.asyncio
async def test_measure_gives_several_metrics_from_one_pass_equal_to_separate_evaluations() -> None:
    """The loss beside other metrics is the one evaluate() and the reference take (the causal-LM
    loss in pieces): it was HF's on the full logits, a few ulps apart at this shape."""
    model = tiny_model(num_hidden_layers=3, vocab_size=64, hidden_size=32, ffn_dim=64, word_embed_proj_dim=32)
    batch = token_batch(model.config, seed=123)
    reference = ReferenceZO(tiny_model(num_hidden_layers=3, vocab_size=64, hidden_size=32, ffn_dim=64,
                                       word_embed_proj_dim=32), zoruntime.ZOSGD(lr=1e-2))  # fmt: skip

    def argmax_share(logits: torch.Tensor, b) -> torch.Tensor:
        return (logits.argmax(-1) == b.labels).float().mean()

    async with zoruntime.Runtime(model, zoruntime.ZOSGD(lr=1e-2), trace=True) as rt:
        await rt.step(batch)
        reference.step(batch)
        passes = len([m for m in rt.timeline.steps if m.phase == "eval"])
        both = await rt.measure(batch, {"loss": None, "share": argmax_share})
        assert both["loss"] == reference.evaluate(batch)
        assert len([m for m in rt.timeline.steps if m.phase == "eval"]) == passes + 1
        assert both == {"loss": await rt.evaluate(batch), "share": await rt.evaluate(batch, metric=argmax_share)}
        with pytest.raises(ValueError, match="needs at least one metric"):
            await rt.measure(batch, {})
