"""Test doubles shipped with the library.

``simulate`` runs the real scheduler on the simulated backend: "how long would a step take
with these per-block figures and this policy?" without tensors or threads, on a virtual
clock, in milliseconds of real time. ``inject_faults`` makes chosen tasks of a real runtime
fail, for testing that a failed step damages nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .device.simulated import VirtualClockLoop, simulated_lanes
from .policies import FixedDepth, ModelLayout, OpFigures, Policy
from .runtime import Instruments, Kind, Scheduler, Task, step_graph
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


class InjectedFault(RuntimeError):
    """Raised by ``inject_faults`` inside a task."""


def inject_faults(runtime: Any, should_fail: Callable[[int, Task], bool]) -> list[tuple[int, str]]:
    """Make the tasks of an open ``Runtime`` raise ``InjectedFault`` where ``should_fail(step, task)``.

    The fault is raised when the task's work starts, as a failing kernel or allocation would.
    Returns the list that records (step, task) of every injected fault.
    """
    executor = runtime._executor
    if executor is None:
        raise RuntimeError("open the runtime before injecting faults")
    original = executor.work_for
    injected: list[tuple[int, str]] = []

    def work_for(task: Task) -> Callable[[], None]:
        work = original(task)
        step = executor.state.step if executor.state is not None else runtime.step_index
        if not should_fail(step, task):
            return work

        def failing() -> None:
            injected.append((step, str(task)))
            raise InjectedFault(f"fault injected into {task} of step {step}")

        return failing

    setattr(executor, "work_for", work_for)  # noqa: B010 (an instance attribute over the method)
    return injected
