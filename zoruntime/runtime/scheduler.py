"""The asyncio scheduler: runs a task graph on lanes, in lane order, after each task's dependencies.

One coroutine per lane, all inside one ``asyncio.TaskGroup`` (nothing is fire-and-forget).
A lane takes its tasks in graph order; before each it awaits the completions of the task's
dependencies, then hands the task's work to the lane. What a completion means is the lane's
business: a CPU thread lane completes when the work has run, a CUDA stream lane when the work
is enqueued behind its events. The clock and the instruments are injected. Stdlib only: the
scheduler never sees a tensor.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from .graph import Lane, Task, TaskGraph
from .instruments import Instruments

Work = Callable[[], object]


@dataclass(frozen=True, slots=True)
class Completion:
    """What a lane reports for a finished task: when it started and ended (None if the lane
    measures later, as CUDA events do) and a handle that dependants receive in ``after``."""

    started: float | None = None
    finished: float | None = None
    handle: object = None


class LaneRunner(Protocol):
    """Runs one task's work at a time, in the order given."""

    async def run(self, task: Task, work: Work, after: Sequence[object]) -> Completion: ...


class TaskFailed(RuntimeError):
    """A task of a step raised; ``task`` and ``step`` say which, ``__cause__`` holds the error."""

    def __init__(self, step: int, task: Task, error: BaseException) -> None:
        super().__init__(f"step {step}: {task} failed: {type(error).__name__}: {error}")
        self.step = step
        self.task = task


class Scheduler:
    """Runs task graphs; one scheduler serves every step of a runtime."""

    def __init__(
        self,
        lanes: Mapping[Lane, LaneRunner],
        clock: Callable[[], float] = time.perf_counter,
        instruments: Instruments | None = None,
    ) -> None:
        self.lanes = dict(lanes)
        self.clock = clock
        self.instruments = instruments or Instruments()

    async def run(
        self, graph: TaskGraph, work_for: Callable[[Task], Work], step: int, *, mark_end: bool = True
    ) -> None:
        """Run every task of ``graph``; the first failure is raised as ``TaskFailed`` after every
        lane has stopped (the others are cancelled and wait for their in-flight work).

        ``mark_end=False`` leaves the ``step_finished`` hook to the caller: with lanes that
        complete when a task is enqueued (CUDA), the step ends when the device is done, which
        only the caller knows."""
        loop = asyncio.get_running_loop()
        done: list[asyncio.Future[Completion]] = [loop.create_future() for _ in graph.tasks]
        hooks = self.instruments
        if hooks:
            hooks.call("step_started", step, self.clock(), graph.phase)
        try:
            async with asyncio.TaskGroup() as group:
                for lane in graph.lanes:
                    tasks = graph.on_lane(lane)
                    if tasks:
                        group.create_task(self._run_lane(self.lanes[lane], tasks, done, work_for, step))
        except BaseExceptionGroup as failures:
            first = next((e for e in _leaves(failures) if isinstance(e, TaskFailed)), None)
            if first is None:
                raise
            raise first from first.__cause__
        finally:
            for future in done:
                if not future.done():
                    future.cancel()
        if hooks and mark_end:
            hooks.call("step_finished", step, self.clock(), graph.phase)

    async def _run_lane(
        self,
        lane: LaneRunner,
        tasks: Sequence[Task],
        done: list[asyncio.Future[Completion]],
        work_for: Callable[[Task], Work],
        step: int,
    ) -> None:
        hooks = self.instruments
        for task in tasks:
            after = []
            for dep in task.deps:
                after.append((await done[dep]).handle)
            if hooks:
                hooks.call("task_issued", step, task, self.clock())
            try:
                completion = await lane.run(task, work_for(task), after)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                raise TaskFailed(step, task, error) from error
            if hooks:
                if completion.started is not None:
                    hooks.call("task_started", step, task, completion.started)
                if completion.finished is not None:
                    hooks.call("task_finished", step, task, completion.finished)
            done[task.index].set_result(completion)


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out
