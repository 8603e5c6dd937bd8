"""Streaming units finer than a block: a block cut into its attention and MLP halves, or into a
unit per linear layer, each a group with its own direction. The cut follows the order the
layer's forward calls its modules; the forward runs a unit at a time, paused in between; the
runtime equals a reference cut the same way, bitwise (``test_runtime_exact`` runs every policy
with finer units too)."""

from __future__ import annotations

import gc
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import tiny_model, token_batch
from torch import nn
from transformers import AutoModelForCausalLM, MixtralConfig

import zoruntime
from zoruntime.models import adapter_for
from zoruntime.models.freeze import freeze
from zoruntime.models.segments import SegmentedLayer, _Forward
from zoruntime.policies import FixedDepth, MemoryBudget
from zoruntime.runtime import Task
from zoruntime.storage import model_layout
from zoruntime.testing import inject_faults
from zoruntime.zo.reference import ReferenceZO

CONFIG = zoruntime.ZOSGD(lr=1e-2, eps=1e-3, weight_decay=0.1, seed=11)


def _names(variant: str, unit: str) -> list[str]:
    return [u.name for u in adapter_for(tiny_model(variant, num_hidden_layers=1), unit).units.streamable]


def test_blocks_are_cut_in_the_order_their_forward_calls_their_modules() -> None:
    """Tiny blocks (ffn = 2h) pack a few attention projections at a time; norms ride along."""
    assert _names("pre_ln_tied", "half") == ["block.0.attention", "block.0.mlp"]
    assert _names("pre_ln_tied", "linear") == ["block.0.q_proj", "block.0.k_proj-v_proj", "block.0.out_proj",
                                              "block.0.fc1", "block.0.fc2"]  # fmt: skip
    pre = adapter_for(tiny_model("pre_ln_tied", num_hidden_layers=1), "linear").layout.segments[0]
    post = adapter_for(tiny_model("post_ln_proj", num_hidden_layers=1), "linear").layout.segments[0]
    assert pre[0] == ["self_attn_layer_norm", "self_attn.q_proj"]  # a norm rides with the linear after it...
    assert post[2] == ["self_attn.out_proj", "self_attn_layer_norm"]  # ...or, after the attention (post-LN), before
    assert post[4] == ["fc2", "final_layer_norm"]
    llama = adapter_for(tiny_model("llama_gqa", num_hidden_layers=1), "linear").layout.segments[0]
    assert llama == [["input_layernorm", "self_attn.q_proj", "self_attn.k_proj"],
                     ["self_attn.v_proj", "self_attn.o_proj", "post_attention_layernorm"], ["mlp.gate_proj"],
                     ["mlp.up_proj"], ["mlp.down_proj"]]  # fmt: skip
    assert _names("pre_ln_tied", "block") == ["block.0"]


@pytest.mark.parametrize(
    ("name", "units"),
    [("opt-175b", ["q_proj-out_proj", "fc1", "fc2"]), ("llama-2-70b", ["q_proj-o_proj", "gate_proj", "up_proj",
                                                                        "down_proj"])],
)  # fmt: skip
def test_linears_are_packed_up_to_the_largest_ones_size(name: str, units: list[str]) -> None:
    """At real shapes OPT's four attention projections (4h² with their biases and norm) pack
    into one unit the size of fc1, so its blocks stream as three equal units, and a Llama's
    grouped-query attention (2.25h²) into one beside each MLP projection: no unit outgrows the
    largest linear (within PACKING_SLACK), so the slots are no larger than one linear's."""
    from zoruntime.models.init import meta_model
    from zoruntime.models.segments import PACKING_SLACK
    from zoruntime.models.shapes import named_config

    adapter = adapter_for(meta_model(named_config(name), torch.float16), "linear")
    assert [u.name.partition(".")[2].partition(".")[2] for u in adapter.units.streamable[: len(units)]] == units
    sizes = [lay.numel for lay in adapter.block_layouts[: len(units)]]
    largest_linear = max(p.numel() for n, p in adapter.model.named_parameters() if n.endswith("proj.weight")
                         or n.endswith("fc1.weight"))  # fmt: skip
    assert max(sizes) <= largest_linear * PACKING_SLACK
    assert sum(sizes) == adapter_for(meta_model(named_config(name), torch.float16)).block_layouts[0].numel


def test_units_are_groups_and_the_slots_follow_the_largest_unit() -> None:
    model = tiny_model("llama_gqa", num_hidden_layers=2)
    whole, linear = adapter_for(model), adapter_for(model, "linear")
    assert sum(lay.numel for lay in linear.block_layouts) == sum(lay.numel for lay in whole.block_layouts)
    assert [u.group for u in linear.units.streamable] == list(range(1, 11))  # one direction each
    layout = model_layout(linear, torch.float32)
    assert layout.unit_bytes == max(lay.nbytes for lay in linear.block_layouts) < whole.block_layouts[0].nbytes / 2
    assert layout.bytes_needed(FixedDepth(1).plan(layout)) < model_layout(whole, torch.float32).bytes_needed(
        FixedDepth(1).plan(model_layout(whole, torch.float32))
    )


def test_a_model_whose_blocks_route_tokens_keeps_whole_blocks() -> None:
    config = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=r"MixtralDecoderLayer cannot be streamed as unit='linear'.*use unit='block'"):
        adapter_for(model, "linear")
    assert len(adapter_for(model).units.streamable) == 1
    with pytest.raises(ValueError, match=r"unit must be one of 'block', 'half', 'linear', not 'row'"):
        FixedDepth(1, unit="row")


@pytest.mark.asyncio
@pytest.mark.parametrize("unit", ["half", "linear"])
async def test_16_bit_masters_with_stochastic_rounding_and_a_frozen_block_equal_the_reference(unit: str) -> None:
    model = tiny_model("llama_gqa", dtype=torch.bfloat16, num_hidden_layers=3)
    twin = tiny_model("llama_gqa", dtype=torch.bfloat16, num_hidden_layers=3)
    for m in (model, twin):
        freeze(m, "blocks:1")
    reference = ReferenceZO(twin, CONFIG, unit=unit)
    async with zoruntime.Runtime(model, CONFIG, policy=MemoryBudget(10**6, depth=2, unit=unit)) as rt:
        for i in range(3):
            assert await rt.step(token_batch(model.config, seed=i)) == reference.step(token_batch(model.config, seed=i))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))


def _paused_forwards() -> list[_Forward]:
    gc.collect()
    return [g for g in gc.get_objects() if type(g) is _Forward and not g.dead]


_LEFT: list[str] = []  # module-level: a bound layer is a deep copy


class _TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.second(torch.relu(self.first(x)))
        finally:
            _LEFT.append("left the forward")


def test_a_segmented_forward_pauses_between_segments_on_its_callers_thread() -> None:
    log = _LEFT
    log.clear()
    layer = _TwoLinears()
    x = torch.randn(3, 4)
    params = {n: p.detach().clone() for n, p in layer.named_parameters()}
    segmented = SegmentedLayer(layer, params, [["first"], ["second"]])

    run = segmented.start(lambda shell: shell(x))
    assert run.resume() is None and run.next_segment == 1 and log == []  # paused before `second`
    params["second.weight"].mul_(2)  # what the next segment reads may change while paused
    with torch.no_grad():
        expected = torch.nn.functional.linear(torch.relu(layer.first(x)), 2 * layer.second.weight, layer.second.bias)
    assert torch.equal(run.resume(), expected) and log == ["left the forward"]
    with pytest.raises(RuntimeError, match="this forward has ended"):
        run.resume()

    on_its_thread = segmented.start(lambda shell: shell(x))
    on_its_thread.resume()
    with ThreadPoolExecutor(1) as other:
        with pytest.raises(RuntimeError, match="resumed on the thread that began it"):
            other.submit(on_its_thread.resume).result()
        on_its_thread.cancel()  # on its own thread: unwound at once
        assert log[-1] == "left the forward" and not _paused_forwards()

        elsewhere = other.submit(lambda: segmented.start(lambda shell: shell(x))).result()
        other.submit(elsewhere.resume).result()
        assert len(_paused_forwards()) == 1
        elsewhere.cancel()  # from another thread: dropped, unwound on its own at its next switch
        other.submit(lambda: segmented.start(lambda shell: shell(x)).resume()).result()
    assert log.count("left the forward") == 3 and not _paused_forwards()


@pytest.mark.asyncio
async def test_a_failure_inside_a_cut_block_ends_its_paused_forwards_and_loses_nothing() -> None:
    clean_model, faulty_model = tiny_model(seed=2, num_hidden_layers=3), tiny_model(seed=2, num_hidden_layers=3)
    policy = FixedDepth(1, unit="linear")
    async with zoruntime.Runtime(clean_model, CONFIG, policy=policy) as clean:
        expected = [await clean.step(token_batch(clean_model.config, seed=i)) for i in range(3)]
    async with zoruntime.Runtime(faulty_model, CONFIG, policy=policy) as rt:
        got = [await rt.step(token_batch(faulty_model.config, seed=0))]

        def fail_once(step: int, task: Task) -> bool:  # block 1's forwards are paused before its MLP
            return step == 1 and task.kind.value == "compute" and task.subject == "block.1.fc1" and not injected

        injected = inject_faults(rt, fail_once)
        with pytest.raises(zoruntime.TaskFailed, match=r"step 1: compute of block.1.fc1 failed: InjectedFault"):
            await rt.step(token_batch(faulty_model.config, seed=1))
        got += [await rt.step(token_batch(faulty_model.config, seed=i)) for i in (1, 2)]
        assert not _paused_forwards()  # the failed step's were ended (on the compute thread, at its next switch)
    assert injected == [(1, "compute of block.1.fc1")] and got == expected
    assert all(torch.equal(a, b) for a, b in zip(clean_model.parameters(), faulty_model.parameters(), strict=True))


def test_train_and_replay_with_a_unit_per_linear_layer(tmp_path, capsys) -> None:
    """The unit is part of the run: it is recorded in the journal, and replay cuts the blocks the
    same way (each unit draws its own z) to rebuild the trained weights bitwise."""
    from safetensors.torch import load_file

    from zoruntime.journal import read_header
    from zoruntime.replay import main as replay_main
    from zoruntime.train import main as train_main

    out = tmp_path / "run"
    args = ["--no-progress", "--eval-every", "0", "--no-trace", "--max-length", "16", "--steps", "3",
            "--policy", "depth=1,unit=linear", "--out", str(out)]  # fmt: skip
    assert train_main(args) == 0, capsys.readouterr().err
    assert read_header(out / "journal.jsonl")["unit"] == "linear"
    assert replay_main(["--run", str(out), "--out", str(tmp_path / "replayed")]) == 0
    trained, replayed = (
        load_file(out / "model" / "model.safetensors"),
        load_file(tmp_path / "replayed" / "model.safetensors"),
    )
    assert all(torch.equal(trained[k], replayed[k]) for k in trained)
    assert train_main([*args[:-2], "--policy", "depth=1,unit=row", "--out", str(tmp_path / "x")]) == 2
    assert "unit= one of block, half, linear" in capsys.readouterr().err
