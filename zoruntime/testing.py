"""Test doubles shipped with the library: run the real scheduler on the simulated backend.

``simulate`` answers "how long would a step take with these per-block figures and this
policy?" without tensors or threads, on a virtual clock, in milliseconds of real time.
"""

from __future__ import annotations

from collections.abc import Iterable

from .device.simulated import VirtualClockLoop, simulated_lanes
from .policies import FixedDepth, ModelLayout, OpFigures, Policy
from .runtime import Instruments, Kind, Scheduler, step_graph
from .tracing import Timeline, TimelineRecorder


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
    block_bytes: int = 1,
    instruments: Iterable[object] = (),
) -> Timeline:
    """Simulate ``steps`` steps of a ``num_blocks`` model; the timeline holds every task's span."""
    figures = OpFigures(upload_s, compute_s, offload_s, embed_s, head_s)
    plan = (policy or FixedDepth(1)).plan(ModelLayout(num_blocks, block_bytes))
    graph = step_graph(num_blocks, plan)
    recorder = TimelineRecorder(bytes_of=lambda task: block_bytes if task.kind in (Kind.UPLOAD, Kind.OFFLOAD) else 0)
    loop = VirtualClockLoop()
    scheduler = Scheduler(
        simulated_lanes(lambda task: figures.duration(task.kind)),
        clock=loop.time,
        instruments=Instruments([recorder, *instruments]),
    )

    async def run() -> None:
        for step in range(steps):
            await scheduler.run(graph, lambda task: _no_work, step)

    try:
        loop.run_simulation(run())
    finally:
        loop.close()
    return recorder.timeline


def _no_work() -> None:
    return None
