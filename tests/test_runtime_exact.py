"""Invariant 1 on the CPU backend: the offloaded runtime equals the in-memory reference bitwise,
step after step, under every policy; invariant 2 (no drift) and 5 (nothing pending is lost)."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, tiny_model, token_batch

import zoruntime
from zoruntime.models import adapter_for
from zoruntime.policies import FixedDepth, MemoryBudget
from zoruntime.zo.reference import ReferenceZO

BLOCKS = 6
CONFIG = zoruntime.ZOSGD(lr=1e-2, eps=1e-3, weight_decay=0.1, seed=3)


def _block_bytes(variant: str = "pre_ln_tied") -> int:
    return adapter_for(tiny_model(variant, num_hidden_layers=BLOCKS)).block_layouts[0].nbytes


def _reference(variant: str, steps: int, config: zoruntime.ZOSGD = CONFIG, unit: str = "block"):
    model = tiny_model(variant, seed=1, num_hidden_layers=BLOCKS)
    ref = ReferenceZO(model, config, unit=unit)
    return model, [ref.step(token_batch(model.config, seed=i)) for i in range(steps)], ref


async def _offloaded(variant: str, steps: int, policy, config: zoruntime.ZOSGD = CONFIG):
    model = tiny_model(variant, seed=1, num_hidden_layers=BLOCKS)
    async with zoruntime.Runtime(model, config, device="cpu", policy=policy) as rt:
        stats = [await rt.step(token_batch(model.config, seed=i)) for i in range(steps)]
        plan = rt.statistics()
    return model, stats, plan


def _policies(block: int) -> dict[str, object]:
    """Every kind of plan; budgets in units of one block's bytes."""
    return {
    "serial": FixedDepth(0),
    "algorithm1": FixedDepth(1),
    "depth2": FixedDepth(2),
    "depth4": FixedDepth(4),
    "budget_none_resident": MemoryBudget(4 * block),  # 3 slots + 1 working (z drawn into it)
    "budget_some_resident": MemoryBudget(6 * block),
    "budget_all_resident": MemoryBudget(100 * block),
    "offload_every_2": FixedDepth(1, offload_every=2),
    "offload_every_3_serial": FixedDepth(0, offload_every=3),
    "budget_offload_every_2": MemoryBudget(6 * block, offload_every=2),
    # blocks streamed as several units: halves, or a unit per linear layer
    "halves_depth1": FixedDepth(1, unit="half"),
    "linears_serial": FixedDepth(0, unit="linear"),
    "linears_depth2_offload_every_2": FixedDepth(2, offload_every=2, unit="linear"),
    "linears_budget_some_resident": MemoryBudget(2 * block, unit="linear"),
    }  # fmt: skip


POLICIES = sorted(_policies(1))
RESIDENT = {"budget_none_resident": 0, "budget_some_resident": 2, "budget_all_resident": BLOCKS,
            "budget_offload_every_2": 2}  # fmt: skip


@pytest.mark.asyncio
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", POLICIES)
async def test_runtime_equals_reference_bitwise(policy: str, family: str) -> None:
    chosen = _policies(_block_bytes(family))[policy]
    ref_model, ref_stats, _ = _reference(family, 5, unit=chosen.unit)
    model, stats, plan = await _offloaded(family, 5, chosen)
    if chosen.unit == "block":
        assert len(plan.resident_units) == RESIDENT.get(policy, 0)
    else:  # units finer than a block: the reference cut the same way draws the same z
        assert (0 < len(plan.resident_units) < 6 * BLOCKS) == ("budget" in policy)
    assert stats == ref_stats
    for (name, a), b in zip(ref_model.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.asyncio
@pytest.mark.parametrize("variant", ["post_ln_proj", "pre_ln_untied"])
async def test_runtime_equals_reference_on_other_architectures(variant: str) -> None:
    schedule = zoruntime.ZOSGD(lr=1e-2, eps=1e-3, seed=5, lr_schedule=lambda step: 1e-2 / (1 + step))
    ref_model, ref_stats, _ = _reference(variant, 3, schedule)
    model, stats, _ = await _offloaded(variant, 3, FixedDepth(1), schedule)
    assert stats == ref_stats
    assert [s.lr for s in stats] == [1e-2, 5e-3, 1e-2 / 3]
    for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.asyncio
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
async def test_lr_zero_never_drifts_through_the_runtime(dtype: torch.dtype, family: str) -> None:
    model = tiny_model(family, seed=2, dtype=dtype, num_hidden_layers=BLOCKS)
    before = {n: p.clone() for n, p in model.named_parameters()}
    async with zoruntime.Runtime(model, zoruntime.ZOSGD(lr=0.0, eps=1e-2, weight_decay=0.3)) as rt:
        for i in range(8):
            await rt.step(token_batch(model.config, seed=i))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


@pytest.mark.asyncio
async def test_flush_applies_the_pending_update_once_and_the_model_sees_it() -> None:
    ref_model, _, _ = _reference("pre_ln_tied", 3)
    model = tiny_model(seed=1, num_hidden_layers=BLOCKS)
    async with zoruntime.Runtime(model, CONFIG, policy=MemoryBudget(6 * _block_bytes())) as rt:
        for i in range(3):
            await rt.step(token_batch(model.config, seed=i))
        assert rt.statistics().pending_update
        await rt.flush()
        assert not rt.statistics().pending_update
        for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
            assert torch.equal(a, b)
        await rt.flush()  # nothing pending: a second flush changes nothing
    for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.asyncio
async def test_evaluate_sees_the_pending_update_and_matches_the_reference() -> None:
    _, _, ref = _reference("pre_ln_tied", 3)
    model = tiny_model(seed=1, num_hidden_layers=BLOCKS)
    held_out = token_batch(model.config, seed=99)
    async with zoruntime.Runtime(model, CONFIG, policy=FixedDepth(2)) as rt:
        for i in range(3):
            await rt.step(token_batch(model.config, seed=i))
        assert await rt.evaluate(held_out) == ref.evaluate(held_out)
        assert not rt.statistics().pending_update
        # training goes on exactly after an evaluation
        stats = await rt.step(token_batch(model.config, seed=3))
    assert stats == ref.step(token_batch(model.config, seed=3))
    for a, b in zip(ref.model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.asyncio
async def test_offloading_every_k_steps_writes_back_every_kth_step_and_lags_exactly() -> None:
    """Offloads happen at steps 2 and 5 only; an evaluation in between sees every update; the
    host masters lag between offloads, yet every loss and the final weights are the reference's."""
    steps, k = 6, 3
    ref_model, ref_stats, ref = _reference("pre_ln_tied", 3)
    model = tiny_model("pre_ln_tied", seed=1, num_hidden_layers=BLOCKS)
    policy = FixedDepth(1, offload_every=k)
    async with zoruntime.Runtime(model, CONFIG, policy=policy, trace=True) as rt:
        stats = [await rt.step(token_batch(model.config, seed=i)) for i in range(3)]
        assert stats == ref_stats
        evaluated = await rt.evaluate(token_batch(model.config, seed=9))
        assert evaluated == ref.evaluate(token_batch(model.config, seed=9))
        stats += [await rt.step(token_batch(model.config, seed=i)) for i in range(3, steps)]
        offloads = {s.step for s in rt.timeline.spans if s.kind == "offload" and s.phase == "step"}
    assert offloads == {2, 5}
    ref_stats += [ref.step(token_batch(model.config, seed=i)) for i in range(3, steps)]
    assert stats == ref_stats
    for (name, a), b in zip(ref_model.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
