"""The scheduler on the simulated backend: exact event order, the pipeline bound, lane and
dependency rules, failures and deadlocks."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from zoruntime.planning.simulated import SimulatedLane, SimulationDeadlock, VirtualClockLoop, simulated_lanes
from zoruntime.policies import FixedDepth, MemoryBudget, OpFigures, Plan
from zoruntime.runtime import Instruments, Kind, Lane, Scheduler, Task, TaskFailed, TaskGraph, step_graph, uniform_units
from zoruntime.runtime.scheduler import Completion, Work
from zoruntime.testing import check_timeline, simulate


class EventLog:
    def __init__(self) -> None:
        self.events: list[tuple[float, str, str]] = []

    def task_issued(self, step: int, task: Task, time: float) -> None:
        self.events.append((time, "issue", str(task)))

    def task_finished(self, step: int, task: Task, time: float) -> None:
        self.events.append((time, "finish", str(task)))


def test_algorithm_1_issues_events_in_this_exact_order() -> None:
    log = EventLog()
    simulate(3, upload_s=1.0, compute_s=1.0, offload_s=1.0, policy=FixedDepth(1), instruments=[log])
    # lanes wake in FIFO order; every issue follows the finish of what it depends on
    assert log.events == [
        (0.0, "issue", "upload of block.0"),
        (0.0, "issue", "embed"),
        (0.0, "finish", "embed"),
        (1.0, "finish", "upload of block.0"),
        (1.0, "issue", "upload of block.1"),
        (1.0, "issue", "compute of block.0"),
        (2.0, "finish", "upload of block.1"),
        (2.0, "finish", "compute of block.0"),
        (2.0, "issue", "compute of block.1"),
        (2.0, "issue", "offload of block.0"),
        (2.0, "issue", "upload of block.2"),
        (3.0, "finish", "compute of block.1"),
        (3.0, "finish", "offload of block.0"),
        (3.0, "issue", "offload of block.1"),
        (3.0, "finish", "upload of block.2"),
        (3.0, "issue", "compute of block.2"),
        (4.0, "finish", "offload of block.1"),
        (4.0, "finish", "compute of block.2"),
        (4.0, "issue", "head"),
        (4.0, "issue", "offload of block.2"),
        (4.0, "finish", "head"),
        (5.0, "finish", "offload of block.2"),
    ]


FIGURES = {
    "balanced": (1.0, 1.0, 1.0),
    "upload_bound": (3.0, 1.0, 1.0),
    "compute_bound": (1.0, 3.0, 0.5),
    "offload_bound": (0.5, 1.0, 2.0),
    "fp16_opt13b_h200": (11.4e-3, 3.3e-3, 11.4e-3),
}


@pytest.mark.parametrize("figures", sorted(FIGURES))
@pytest.mark.parametrize("blocks", [4, 24, 96])
@pytest.mark.parametrize("depth", [1, 2, 4])
def test_makespan_reaches_the_pipeline_bound(figures: str, blocks: int, depth: int) -> None:
    u, c, o = FIGURES[figures]
    timeline = simulate(blocks, u, c, o, FixedDepth(depth))
    bound = OpFigures(u, c, o).pipeline_bound(blocks)
    assert timeline.makespan <= bound * 1.02
    assert timeline.makespan >= bound * (1 - 1e-9)  # nothing beats fill + steady state + drain


def test_embedding_and_head_overlap_the_first_upload_and_last_offload() -> None:
    timeline = simulate(24, 1.0, 0.5, 1.0, FixedDepth(1), embed_s=0.5, head_s=0.2)
    figures = OpFigures(1.0, 0.5, 1.0, embed_s=0.5, head_s=0.2)
    assert timeline.makespan == pytest.approx(figures.pipeline_bound(24), rel=1e-12)
    assert figures.pipeline_bound(24) == 1.0 + 0.5 + 23 * 1.0 + 1.0
    # an embedding longer than the prefetch window stalls uploads: the bound stays a lower bound
    slow = OpFigures(1.0, 0.5, 1.0, embed_s=5.0, head_s=5.0)
    assert simulate(24, 1.0, 0.5, 1.0, FixedDepth(1), embed_s=5.0, head_s=5.0).makespan >= slow.pipeline_bound(24)
    # and a compute lane busier than the block pipeline sets the bound
    assert OpFigures(0.1, 1.0, 0.1, embed_s=9.0, head_s=9.0).pipeline_bound(4) == 9.0 + 4.0 + 9.0


@pytest.mark.parametrize("figures", sorted(FIGURES))
@pytest.mark.parametrize("blocks", [4, 24])
def test_depth_zero_is_the_serial_sum(figures: str, blocks: int) -> None:
    u, c, o = FIGURES[figures]
    timeline = simulate(blocks, u, c, o, FixedDepth(0))
    assert timeline.makespan == pytest.approx(OpFigures(u, c, o).serial_time(blocks), rel=1e-12)
    spans = sorted(timeline.spans, key=lambda s: s.start)
    assert all(a.end <= b.start + 1e-12 for a, b in itertools.pairwise(spans))  # nothing overlaps


def test_units_of_unequal_size_take_their_share_of_the_mean_units_times() -> None:
    """Serially, a unit's upload, compute and offload scale with its size, so the step is the
    serial sum still; pipelined, a small unit's upload waits for the slot a large unit's offload
    holds, so six uneven units a block (OPT's linears, 1:1:1:1:4:4) run slower than even ones of
    the same total, which run as uniform units do; sizes of the wrong length are refused."""
    u, c, o = 1.0, 0.4, 1.0
    uneven = [1, 1, 1, 1, 4, 4] * 4
    serial = simulate(24, u, c, o, FixedDepth(0), unit_sizes=uneven)
    assert serial.makespan == pytest.approx(OpFigures(u, c, o).serial_time(24), rel=1e-12)
    upload = {s.block: s.end - s.start for s in serial.spans if s.kind == "upload"}
    assert upload[4] == pytest.approx(4 * upload[0], rel=1e-12)
    even = simulate(24, u, c, o, FixedDepth(1), unit_sizes=[3] * 24)
    assert even.makespan == simulate(24, u, c, o, FixedDepth(1)).makespan
    assert simulate(24, u, c, o, FixedDepth(1), unit_sizes=uneven).makespan > 1.15 * even.makespan
    with pytest.raises(ValueError, match="unit_sizes needs 24 positive sizes"):
        simulate(24, u, c, o, FixedDepth(1), unit_sizes=[1] * 23)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_lanes_never_overlap_and_tasks_start_after_their_dependencies(depth: int) -> None:
    timeline = simulate(12, 2.0, 1.0, 1.5, FixedDepth(depth), steps=2)
    check_timeline(timeline)
    assert {s.step for s in timeline.spans} == {0, 1}


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_uploads_run_at_most_depth_blocks_ahead_and_reuse_slots_after_offload(depth: int) -> None:
    timeline = simulate(16, 0.1, 1.0, 0.1, FixedDepth(depth))  # fast links: uploads want to run ahead
    uploads = sorted((s for s in timeline.spans if s.kind == "upload"), key=lambda s: s.block or 0)
    computes = {s.block: s for s in timeline.spans if s.kind == "compute"}
    offloads = {s.block: s for s in timeline.spans if s.kind == "offload"}
    slots = depth + 2
    for up in uploads:
        assert up.block is not None
        if up.block >= depth + 1:
            assert up.start >= computes[up.block - depth - 1].end
        if up.block >= slots:
            assert up.start >= offloads[up.block - slots].end
            assert up.slot == offloads[up.block - slots].slot
    # and they do run ahead: block depth's upload is done before compute of block.0 ends
    assert uploads[depth].end <= computes[0].end


def test_resident_units_skip_transfers_and_shorten_a_transfer_bound_step() -> None:
    streamed = simulate(24, 3.0, 1.0, 3.0, FixedDepth(1))
    budget = MemoryBudget(12, depth=1)  # block_bytes=1: 12 - 1 working - 3 slots = 8 resident
    partly = simulate(24, 3.0, 1.0, 3.0, budget)
    uploaded = {s.block for s in partly.spans if s.kind == "upload"}
    assert len(uploaded) == 16
    assert partly.makespan < 0.75 * streamed.makespan
    check_timeline(partly)


def test_a_failing_task_is_named_and_no_task_is_left_behind() -> None:
    loop = VirtualClockLoop()

    def durations(step: int, task: Task) -> float:
        if task.kind == Kind.COMPUTE and task.unit.name == "block.2":
            raise ValueError("boom")
        return 1.0

    scheduler = Scheduler(simulated_lanes(durations), clock=loop.time)

    async def main() -> set[asyncio.Task]:
        with pytest.raises(TaskFailed, match=r"step 7: compute of block.2 failed: ValueError: boom") as info:
            await scheduler.run(step_graph(uniform_units(6), Plan(1)), lambda task: lambda: None, 7)
        assert info.value.task.unit.name == "block.2" and isinstance(info.value.__cause__, ValueError)
        return asyncio.all_tasks() - {asyncio.current_task()}

    try:
        assert loop.run_until_complete(main()) == set()
    finally:
        loop.close()


def test_a_failure_behind_a_pass_is_raised_by_the_next_one_and_nothing_is_left_running() -> None:
    """Step 3 returns at its head (done at 10); its last offload (10 to 12) fails behind it. The
    next pass raises that failure (naming step 3), stops every lane, and leaves the scheduler
    ready for another pass."""
    loop = VirtualClockLoop()
    failing = {"on": True}

    def durations(step: int, task: Task) -> float:
        return 0.0 if task.kind == Kind.HEAD else 2.0 if task.kind == Kind.OFFLOAD else 1.0

    class FailingLane(SimulatedLane):
        async def run(self, step: int, task: Task, work: Work, after: Sequence[object]) -> Completion:
            if failing["on"] and task.kind == Kind.OFFLOAD and task.unit.name == "block.5":
                await asyncio.sleep(2.0)
                raise ValueError("link down")
            return await super().run(step, task, work, after)

    scheduler = Scheduler({lane: FailingLane(durations) for lane in Lane}, clock=loop.time)
    graph = step_graph(uniform_units(6), Plan(1))

    async def main() -> set[asyncio.Task]:
        await scheduler.run(graph, lambda task: lambda: None, 3)  # the result is in hand
        assert loop.time() == 10.0
        assert scheduler.busy
        with pytest.raises(TaskFailed, match=r"step 3: offload of block.5 failed: ValueError: link down"):
            await scheduler.run(graph, lambda task: lambda: None, 4)
        assert not scheduler.busy
        failing["on"] = False
        await scheduler.run(graph, lambda task: lambda: None, 4)
        await scheduler.join()
        return asyncio.all_tasks() - {asyncio.current_task()}

    try:
        assert loop.run_until_complete(main()) == set()
    finally:
        loop.close()


def test_a_deadlocked_graph_raises_instead_of_hanging() -> None:
    # compute waits for an upload that waits for the compute: a cycle across lanes
    block = uniform_units(1).streamable[0]
    graph = TaskGraph((Task(0, Kind.UPLOAD, block, (1,), slot=0), Task(1, Kind.COMPUTE, block, (0,), slot=0)))
    loop = VirtualClockLoop()
    scheduler = Scheduler(simulated_lanes(lambda step, task: 1.0), clock=loop.time)
    try:
        with pytest.raises(SimulationDeadlock, match="deadlocked"):
            loop.run_simulation(scheduler.run(graph, lambda task: lambda: None, 0))
        assert asyncio.all_tasks(loop) == set()
    finally:
        loop.close()


def test_instruments_cost_nothing_when_absent_and_reject_objects_without_hooks() -> None:
    assert not Instruments()
    assert "task_issued" not in Instruments()

    @dataclass
    class OnlyFinish:
        seen: int = 0

        def task_finished(self, step: int, task: Task, time: float) -> None:
            self.seen += 1

    only = OnlyFinish()
    instruments = Instruments([only])
    assert "task_finished" in instruments and "task_issued" not in instruments
    simulate(3, 1.0, 1.0, 1.0, instruments=[only])
    assert only.seen == 2 + 3 * 3
    with pytest.raises(TypeError, match="defines none of the instrument hooks"):
        Instruments([object()])


def test_mark_end_false_leaves_the_end_of_the_step_to_the_caller() -> None:
    class StepHooks:
        def __init__(self) -> None:
            self.events: list[tuple[str, int]] = []

        def step_started(self, step: int, time: float, phase: str) -> None:
            self.events.append(("started", step))

        def step_finished(self, step: int, time: float, phase: str) -> None:
            self.events.append(("finished", step))

    hooks = StepHooks()
    loop = VirtualClockLoop()
    scheduler = Scheduler(simulated_lanes(lambda step, task: 1.0), clock=loop.time, instruments=Instruments([hooks]))
    graph = step_graph(uniform_units(2), Plan(1))
    try:
        loop.run_simulation(scheduler.run(graph, lambda task: lambda: None, 0))
        loop.run_simulation(scheduler.run(graph, lambda task: lambda: None, 1, mark_end=False))
        loop.run_simulation(scheduler.join())
    finally:
        loop.close()
    assert hooks.events == [("started", 0), ("finished", 0), ("started", 1)]


def test_offloading_every_k_steps_pays_off_where_both_directions_share_the_link() -> None:
    """Transfer-bound (u = o = 2, c = 1), three slots: with independent directions the uploads
    bound the steps either way; sharing the link (duplex 0.8) slows every copy of a step that
    writes back, so writing back every third step only is faster."""
    independent = [simulate(6, 2.0, 1.0, 2.0, FixedDepth(1, offload_every=k), steps=3).makespan for k in (1, 3)]
    assert independent == [3 * 6 * 2.0 + 1.0 + 2.0] * 2  # uploads back to back, then the last compute and offload
    every = simulate(6, 2.0, 1.0, 2.0, FixedDepth(1), steps=3, duplex=0.8)
    lagging = simulate(6, 2.0, 1.0, 2.0, FixedDepth(1, offload_every=3), steps=3, duplex=0.8)
    assert every.makespan == 3 * 6 * 2.5 + 1.0 + 2.5
    assert lagging.makespan <= every.makespan - 6.0  # 12 of its 18 uploads at full speed
    assert {s.step for s in lagging.spans if s.kind == "offload"} == {2}


def test_consecutive_steps_overlap_with_one_pipeline_fill_for_all_of_them() -> None:
    """Upload-bound (u = 2, c = o = 1), depth 1, 8 blocks, 3 steps with a host gap of 1 between
    the calls (shorter than one upload): the next step's first uploads run during the head and
    the gap, so the upload lane never idles and K steps take K·N·max(u, c, o) plus one fill."""
    n, k, u, c, o = 8, 3, 2.0, 1.0, 1.0
    timeline = simulate(n, u, c, o, FixedDepth(1), steps=k, host_gap_s=1.0)
    assert timeline.makespan == k * n * u + (c + o)
    assert simulate(n, u, c, o, FixedDepth(1)).makespan == n * u + (c + o)  # one step: the same fill
    uploads = sorted((s for s in timeline.spans if s.kind == "upload"), key=lambda s: s.start)
    assert len(uploads) == k * n and all(a.end == b.start for a, b in itertools.pairwise(uploads))
    assert [s.unit for s in uploads if s.ahead] == ["block.0", "block.1"] * (k - 1)
    marks = timeline.steps
    assert [b.start - a.end for a, b in itertools.pairwise(marks)] == [1.0] * (k - 1)  # the caller's gap
    check_timeline(timeline)


def test_a_copy_takes_the_link_speed_of_the_step_that_issued_it_whenever_it_starts() -> None:
    """Offloading every second step on a half-duplex link (0.5): every copy of steps 1 and 3 (they
    write back) takes twice as long, every copy of steps 0 and 2 does not, though step 1's last
    offload and its uploads ahead run on after step 2 has begun."""
    timeline = simulate(3, 1.0, 1.0, 1.0, FixedDepth(1, offload_every=2), head_s=0.5, steps=4, duplex=0.5)
    starts = {mark.step: mark.start for mark in timeline.steps}
    copies = [s for s in timeline.spans if s.kind in ("upload", "offload")]
    assert any(s.step == 1 and s.start >= starts[2] for s in copies)  # the case this checks
    assert {(s.step, s.kind, s.end - s.start) for s in copies} == {
        (0, "upload", 1.0), (1, "upload", 2.0), (1, "offload", 2.0),
        (2, "upload", 1.0), (3, "upload", 2.0), (3, "offload", 2.0),
    }  # fmt: skip
