"""Policies: the protocol, FixedDepth, MemoryBudget's placement and its errors, a user's own policy."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from conftest import tiny_model, token_batch

import zoruntime
from zoruntime.policies import FixedDepth, MemoryBudget, ModelLayout, OpFigures, Plan, Policy, spread
from zoruntime.testing import simulate


def test_fixed_depth_plans_stream_everything() -> None:
    plan = FixedDepth(2).plan(ModelLayout.uniform(10, 100))
    assert plan == Plan(2) and plan.slots(10) == 4 and plan.streamed(10) == list(range(10))
    assert Plan(0).slots(10) == 1 and Plan(1).slots(10) == 3 and Plan(5).slots(4) == 4


@pytest.mark.parametrize("depth", [-1, 1.5, True, "2"])
def test_a_bad_depth_is_refused(depth: object) -> None:
    with pytest.raises(ValueError, match=r"prefetch depth must be an int >= 0"):
        FixedDepth(depth)  # type: ignore[arg-type]


def test_memory_budget_keeps_as_many_blocks_resident_as_fit() -> None:
    layout = ModelLayout.uniform(12, 100)
    assert MemoryBudget(400).plan(layout).resident == frozenset()  # 3 slots + 1 working (z drawn into it)
    assert MemoryBudget(499).plan(layout).resident == frozenset()
    assert MemoryBudget(700).plan(layout).resident == spread(3, 12) == {2, 6, 10}
    assert MemoryBudget(1300).plan(layout).resident == frozenset(range(12))
    every = MemoryBudget(1300).plan(layout)
    assert every.slots(12) == 0 and every.streamed(12) == []


def test_memory_budget_below_the_minimum_names_what_it_needs() -> None:
    message = r"399 bytes is too small: depth 1 streams through 3 slots of 100 bytes plus its working buffers"
    with pytest.raises(ValueError, match=message + r", 400 bytes in all"):
        MemoryBudget(399).plan(ModelLayout.uniform(12, 100))
    with pytest.raises(ValueError, match=r"whole number of bytes"):
        MemoryBudget(-5)


def test_a_plan_naming_blocks_that_do_not_exist_is_refused() -> None:
    with pytest.raises(ValueError, match=r"resident units \[7\] do not exist: the model has units 0\.\.3"):
        Plan(1, frozenset({1, 7})).validate(4)


@dataclass(frozen=True)
class LastBlocksResident:
    """A user's policy: keep the last ``count`` blocks resident, prefetch ``depth`` ahead."""

    count: int
    depth: int = 2

    def plan(self, layout: ModelLayout) -> Plan:
        return Plan(self.depth, frozenset(range(layout.num_units - self.count, layout.num_units)))


def test_a_user_policy_plugs_into_the_simulator() -> None:
    assert isinstance(LastBlocksResident(2), Policy)
    timeline = simulate(8, 1.0, 1.0, 1.0, LastBlocksResident(2))
    assert {s.block for s in timeline.spans if s.kind == "upload"} == set(range(6))


@pytest.mark.asyncio
async def test_a_user_policy_plugs_into_the_runtime() -> None:
    model = tiny_model(num_hidden_layers=4)
    async with zoruntime.Runtime(model, zoruntime.ZOSGD(lr=1e-3), policy=LastBlocksResident(1)) as rt:
        await rt.step(token_batch(model.config))
        assert rt.statistics().resident_units == (3,)


def test_an_object_without_plan_is_not_a_policy() -> None:
    with pytest.raises(TypeError, match=r"policy must have a plan\(layout\) method"):
        zoruntime.Runtime(tiny_model(), zoruntime.ZOSGD(), policy=3)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Returns:
    """A user's policy whose plan is whatever it was given."""

    what: object

    def plan(self, layout: ModelLayout) -> object:
        return self.what


@pytest.mark.parametrize("what", [None, (1, frozenset()), {"depth": 1}])
def test_a_policy_that_returns_no_plan_is_refused_naming_it(what: object) -> None:
    with pytest.raises(TypeError, match=r"Returns\.plan\(layout\) must return a zoruntime\.policies\.Plan, got "):
        zoruntime.Runtime(tiny_model(), zoruntime.ZOSGD(), policy=Returns(what))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Cuts:
    """A user's policy that streams whole blocks at depth 1, cut as ``unit`` says."""

    unit: object

    def plan(self, layout: ModelLayout) -> Plan:
        return Plan(1)


@pytest.mark.parametrize("unit", [None, "blocks", 1])
def test_a_policy_whose_unit_is_no_unit_kind_is_refused_naming_it(unit: object) -> None:
    """unit=None reached the model's tracing, which said "unit must be one of block, half,
    linear, not None" without naming the policy; the simulator took any unit."""
    error = (rf"Cuts\.unit must be one of 'block', 'half', 'linear' \(or no unit attribute: whole blocks\), "
             rf"not {unit!r}")  # fmt: skip
    with pytest.raises(ValueError, match=error):
        zoruntime.Runtime(tiny_model(), zoruntime.ZOSGD(), policy=Cuts(unit))
    with pytest.raises(ValueError, match=error):
        simulate(4, 1.0, 1.0, 1.0, Cuts(unit))
    assert simulate(4, 1.0, 1.0, 1.0, Cuts("linear")).makespan == simulate(4, 1.0, 1.0, 1.0, FixedDepth(1)).makespan


@pytest.mark.parametrize("resident", ["01", None, frozenset({"0"}), frozenset({1.5}), 3, [True]])
def test_a_plan_of_other_resident_units_than_ints_is_refused(resident: object) -> None:
    with pytest.raises(ValueError, match=r"resident must be a set of unit numbers \(ints\), got "):
        Plan(1, resident)  # type: ignore[arg-type]


def test_a_plan_keeps_a_copy_of_the_resident_units_it_was_given() -> None:
    given = [0, 1]
    plan = Plan(1, given)  # type: ignore[arg-type]
    given.append(2)
    assert plan.resident == frozenset({0, 1}) and plan == Plan(1, frozenset({0, 1}))


def test_cost_model_turns_bytes_and_flops_into_the_simulated_step() -> None:
    from zoruntime.policies import CostModel

    # an opt-13b block in fp16 over a 55 GB/s link, both forwards of 2048 tokens at 400 TFLOP/s
    block_bytes, flops = 600_000_000, 2 * 2 * 2048 * 300_000_000
    model = CostModel(block_bytes, flops, upload_bytes_per_s=55e9, offload_bytes_per_s=55e9, flops_per_s=400e12)
    figures = model.figures()
    assert figures.upload_s == pytest.approx(600e6 / 55e9) and figures.compute_s == pytest.approx(flops / 400e12)
    timeline = simulate(40, figures.upload_s, figures.compute_s, figures.offload_s, FixedDepth(1))
    assert timeline.makespan == pytest.approx(figures.pipeline_bound(40), rel=1e-9)
    assert figures.pipeline_bound(40) == pytest.approx(figures.upload_s * 41 + figures.compute_s, rel=1e-9)


def test_the_upload_floor_is_each_block_up_the_link_or_computed_whichever_is_longer() -> None:
    assert OpFigures(upload_s=2.0, compute_s=1.0, offload_s=5.0).upload_floor(4) == 8.0  # upload-bound
    assert OpFigures(upload_s=1.0, compute_s=3.0, offload_s=5.0).upload_floor(4) == 12.0  # compute-bound


def test_the_simulator_charges_missed_updates_to_streamed_units_only() -> None:
    from zoruntime.planning.planner import PlanGiven

    # 4 units of u = c = o = 1 s, 4 steps, offload every 4: a streamed unit's compute on the i-th
    # step of a cycle applies i missed updates of 1 s each; a resident one is updated every step
    def compute_s(resident: frozenset[int]) -> dict[tuple[int, str], float]:
        timeline = simulate(4, 1.0, 1.0, 1.0, PlanGiven(Plan(1, resident, 4)), steps=4, update_s=1.0)
        return {(s.step, s.unit): s.end - s.start for s in timeline.spans if s.kind == "compute"}

    assert set(compute_s(frozenset(range(4))).values()) == {1.0}
    some = compute_s(frozenset({1, 3}))
    blocks = sorted({unit for _, unit in some if unit.startswith("block")})
    assert [some[step, blocks[0]] for step in range(4)] == [1.0, 2.0, 3.0, 4.0]
    assert [some[step, blocks[1]] for step in range(4)] == [1.0] * 4


def test_the_cost_model_chooses_how_often_to_offload() -> None:
    from zoruntime.planning.cost import choose_offload_every, cycle_block_time

    figures = OpFigures(upload_s=1.0, compute_s=0.5, offload_s=1.0)
    # every step offloads: both directions share the link, each at 0.9 of its speed
    assert cycle_block_time(figures, 1, update_s=0.2, duplex=0.9) == pytest.approx(1 / 0.9)
    # k = 4: three steps upload-bound at 1.0, the fourth writes back (1/0.9 > 0.5 + 3 * 0.2)
    assert cycle_block_time(figures, 4, update_s=0.2, duplex=0.9) == pytest.approx((3 + 1 / 0.9) / 4)
    # k = 5 makes the last uploads apply updates past the upload time: worse
    assert choose_offload_every(figures, update_s=0.2, duplex=0.9) == 4
    assert choose_offload_every(figures, update_s=0.2, duplex=1.0) == 1  # a full-duplex link: no gain
    with pytest.raises(ValueError, match="0 < duplex <= 1"):
        cycle_block_time(figures, 2, update_s=0.2, duplex=1.5)
