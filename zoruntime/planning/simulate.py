"""``simulate``: the real scheduler on the simulated backend, for what-if planning.

"How long would a step take with these per-block figures and this policy?" answered without
tensors or threads, on a virtual clock, in milliseconds. No torch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

from ..policies.base import FixedDepth, Policy, plan_for, unit_of
from ..runtime.graph import Kind, Task, step_graph
from ..runtime.instruments import Instruments
from ..runtime.scheduler import Scheduler
from ..runtime.units import uniform_units
from ..tracing.recorder import Timeline, TimelineRecorder
from .cost import OpFigures
from .memory import ModelLayout
from .simulated import VirtualClockLoop, simulated_lanes


def simulate(
    num_blocks: int,
    upload_s: float,
    compute_s: float,
    offload_s: float,
    policy: Policy | None = None,
    *,
    embed_s: float = 0.0,
    head_s: float = 0.0,
    steps: int = 1,
    host_gap_s: float = 0.0,
    block_bytes: int = 1,
    duplex: float = 1.0,
    update_s: float = 0.0,
    unit_sizes: Sequence[int] | None = None,
    instruments: Iterable[object] = (),
) -> Timeline:
    """Simulate ``steps`` steps of a ``num_blocks`` model; the timeline holds every task's span.

    Steps overlap as the runtime's do: each returns when its head is done, the caller takes
    ``host_gap_s`` before the next call, and meanwhile the last offloads and the next step's
    first uploads run (the last step uploads nothing ahead: no step follows it).

    ``duplex``: on a step that writes blocks back, the uploads and offloads it issues take
    ``1 / duplex`` longer, even those that run on after the next step has begun (both directions
    share the link; a whole-step approximation). ``update_s``: with
    ``offload_every=k``, a streamed block's compute on the i-th step of a cycle applies i more
    updates than usual, each taking this long (a resident block's never lags). ``unit_sizes``:
    the units' relative sizes in model order (elements, say), for units of unequal size (a block
    cut into its linear layers): each unit's upload, compute and offload then take its share of
    ``num_blocks`` times the figures given, which are the mean unit's; default equal.

    ``block_bytes``: every unit's size, one size for all (``unit_sizes`` scales times only). The
    policy plans on ``ModelLayout.uniform(num_blocks, block_bytes)``: a ``MemoryBudget`` counts
    its budget in these bytes, the working buffer one unit and nothing kept (with the default,
    1, a budget is a number of units: 12 at depth 1 keeps 12 − 3 slots − 1 working = 8
    resident). Each upload and offload span records that many bytes moved (its GB/s in the
    summary)."""
    if not 0 < duplex <= 1 or update_s < 0 or host_gap_s < 0:
        raise ValueError(
            f"need 0 < duplex <= 1, update_s >= 0 and host_gap_s >= 0, got {duplex}, {update_s} and {host_gap_s}"
        )
    figures = OpFigures(upload_s, compute_s, offload_s, embed_s, head_s)
    units = uniform_units(num_blocks, block_bytes)
    share = {u.name: 1.0 for u in units}  # of the mean unit's time
    if unit_sizes is not None:
        if len(unit_sizes) != num_blocks or min(unit_sizes, default=0) <= 0:
            raise ValueError(f"unit_sizes needs {num_blocks} positive sizes, got {list(unit_sizes)}")
        mean = sum(unit_sizes) / num_blocks
        share.update({u.name: size / mean for u, size in zip(units.streamable, unit_sizes, strict=True)})
    policy = policy or FixedDepth(1)
    unit_of(policy)  # refused as the runtime refuses it (the units simulated are ``num_blocks`` whatever the unit)
    plan = plan_for(policy, ModelLayout.uniform(num_blocks, block_bytes))
    # the units whose slot copy may lag updates (a resident unit is updated on the device each step)
    lagging = {u.name for j, u in enumerate(units.streamable) if j not in plan.resident}

    recorder = TimelineRecorder(bytes_of=lambda task: block_bytes if task.kind in (Kind.UPLOAD, Kind.OFFLOAD) else 0)
    loop = VirtualClockLoop()

    def duration(step: int, task: Task) -> float:  # by the step that issued the task, whenever it starts
        seconds = figures.duration(task.kind) * share[task.unit.name]
        if task.kind in (Kind.UPLOAD, Kind.OFFLOAD) and plan.offloads_at(step):
            return seconds / duplex
        if task.kind == Kind.COMPUTE and task.unit.name in lagging:
            return seconds + step % plan.offload_every * update_s * share[task.unit.name]
        return seconds

    scheduler = Scheduler(
        simulated_lanes(duration),
        clock=loop.time,
        instruments=Instruments([recorder, *instruments]),
    )

    async def run() -> None:
        rotation = 0
        for step in range(steps):
            if step:
                await asyncio.sleep(host_gap_s)
            graph = step_graph(units, plan, plan.offloads_at(step), step < steps - 1, rotation)
            await scheduler.run(graph, lambda task: _no_work, step)
            rotation = graph.rotation_after
        await scheduler.join()

    try:
        loop.run_simulation(run())
    finally:
        loop.close()
    return recorder.timeline


def _no_work() -> None:
    return None
