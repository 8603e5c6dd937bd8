"""The asyncio scheduler: runs a task graph on lanes, in lane order, after each task's dependencies.

Two kinds of lanes. Lanes that each run their own work (``LaneRunner``: CPU threads, the
simulator) get one coroutine per lane and pass; nothing is fire-and-forget: the work a pass
leaves running behind it is awaited by the next pass (or ``join``), which also raises its
failure. A lane takes its tasks in graph order; before each it awaits the completions of the
task's dependencies, then hands the task's work to the lane.

Lanes that complete when a task is enqueued and are all fed by one thread (``Enqueuer``: CUDA
streams ordered by events) get the whole pass in one trip to that thread: every task in graph
order (a topological order, and each lane's own), each given its dependencies' handles. A
trip per task would cost the host a round through the event loop and a thread handoff each,
and the event loop's Python would contend for the GIL with the enqueueing thread's; in one
trip the event loop sleeps while the host enqueues. Nothing is left behind on the host.

The clock and the instruments are injected. Stdlib only: the scheduler never sees a tensor.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from .graph import Lane, Task, TaskGraph
from .instruments import Instruments

Work = Callable[[], object]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Completion:
    """What a lane reports for a finished task: when it started and ended (None if the lane
    measures later, as CUDA events do) and a handle that dependants receive in ``after``."""

    started: float | None = None
    finished: float | None = None
    handle: object = None


class LaneRunner(Protocol):
    """Runs one task's work at a time, in the order given."""

    async def run(self, step: int, task: Task, work: Work, after: Sequence[object]) -> Completion: ...


class Enqueuer(Protocol):
    """Lanes that complete when a task is enqueued, all fed by one thread: a pass goes over whole."""

    def enqueue(self, step: int, task: Task, work: Work, after: Sequence[object]) -> object:
        """On the enqueueing thread: order ``task``'s lane after the handles in ``after``, enqueue
        its work there, and return the handle its dependants will be ordered after."""
        ...

    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the enqueueing thread."""
        ...


@dataclass(frozen=True, slots=True)
class _Pass:
    """One pass as the scheduler runs it: the graph, each task's work (but the uploads ``taken``
    from the previous pass, done ahead), and the tasks that wait on the previous pass (``before``:
    the first upload into a slot, after the slot's last use)."""

    graph: TaskGraph
    works: Mapping[int, Work]
    taken: Mapping[int, asyncio.Future[Completion]]
    before: Mapping[int, asyncio.Future[Completion]]
    step: int


class TaskFailed(RuntimeError):
    """A task of a step raised; ``task`` and ``step`` say which, ``__cause__`` holds the error."""

    def __init__(self, step: int, task: Task, error: BaseException) -> None:
        super().__init__(f"step {step}: {task} failed: {type(error).__name__}: {error}")
        self.step = step
        self.task = task


class Scheduler:
    """Runs task graphs; one scheduler serves every pass of a runtime, and passes overlap.

    ``run`` returns once the tasks the graph waits for are done (a step's head); the rest of
    its lanes' work (the last offloads, the next pass's uploads ahead) goes on behind it. The
    next ``run`` starts each lane after that lane's earlier work, orders the first use of each
    slot after the previous pass's last, and takes the uploads done ahead as its own. A failure
    behind a pass is raised by the next ``run`` or by ``join``."""

    def __init__(
        self,
        lanes: Mapping[Lane, LaneRunner] | Enqueuer,
        clock: Callable[[], float] = time.perf_counter,
        instruments: Instruments | None = None,
    ) -> None:
        self.lanes = dict(lanes) if isinstance(lanes, Mapping) else lanes
        self.clock = clock
        self.instruments = instruments or Instruments()
        self._behind: dict[Lane, asyncio.Task[None]] = {}  # each lane's work still running from earlier passes
        self._released: dict[int, asyncio.Future[Completion]] = {}  # slot → the last pass's release of it
        self._ahead: dict[tuple[str, int], asyncio.Future[Completion]] = {}  # (unit, slot) → upload done ahead

    @property
    def busy(self) -> bool:
        """Whether work of an earlier pass still runs behind it."""
        return any(not lane.done() for lane in self._behind.values())

    async def run(
        self, graph: TaskGraph, work_for: Callable[[Task], Work], step: int, *, mark_end: bool = True
    ) -> None:
        """Run ``graph`` until its waited tasks are done (with an ``Enqueuer``: until every task is
        enqueued); the first failure (of this pass or of work left behind by the one before) is
        raised as ``TaskFailed`` after every lane has stopped (the others are cancelled and wait
        for their in-flight work).

        ``mark_end=False`` leaves the ``step_finished`` hook to the caller: with lanes that
        complete when a task is enqueued (CUDA), the step ends when the device is done, which
        only the caller knows."""
        released, ahead = self._released, self._ahead
        self._released, self._ahead = {}, {}
        taken: dict[int, asyncio.Future[Completion]] = {}  # uploads the previous pass did ahead
        before: dict[int, asyncio.Future[Completion]] = {}  # a task's wait on the previous pass
        for slot, index in graph.first_in_slot.items():
            upload = ahead.get((graph.tasks[index].unit.name, slot))
            if upload is not None:
                taken[index] = upload
            elif slot in released:
                before[index] = released[slot]
        works = {t.index: work_for(t) for t in graph.tasks if t.index not in taken}
        hooks = self.instruments
        if hooks:
            hooks.call("step_started", step, self.clock(), graph.phase)
        this = _Pass(graph, works, taken, before, step)
        done: Mapping[int, asyncio.Future[Completion]] | list[asyncio.Future[Completion]]
        if isinstance(self.lanes, Mapping):
            done = await self._on_lanes(self.lanes, this)
        else:
            done = await self._in_one_trip(self.lanes, this)
        self._released = {**released, **{slot: done[i] for slot, i in graph.releases.items()}}
        self._ahead = {(t.unit.name, t.slot): done[t.index] for t in graph.ahead if t.slot is not None}
        if hooks and mark_end:
            hooks.call("step_finished", step, self.clock(), graph.phase)

    async def _on_lanes(self, runners: Mapping[Lane, LaneRunner], this: _Pass) -> list[asyncio.Future[Completion]]:
        """A coroutine per lane; returns once the waited tasks are done, the rest running behind."""
        graph, works, taken, before, step = this.graph, this.works, this.taken, this.before, this.step
        loop = asyncio.get_running_loop()
        behind, self._behind = self._behind, {}
        done: list[asyncio.Future[Completion]] = [loop.create_future() for _ in graph.tasks]
        for index, upload in taken.items():
            _chain(upload, done[index])
        lanes: dict[Lane, asyncio.Task[None]] = {}
        for lane in graph.lanes:
            tasks = [t for t in graph.on_lane(lane) if t.index not in taken]
            if tasks:
                run_lane = self._run_lane(runners[lane], tasks, done, works, before, step, behind.get(lane))
                lanes[lane] = loop.create_task(run_lane)
            elif lane in behind:
                lanes[lane] = behind[lane]
        try:
            await self._wait(graph, done, lanes)
        except BaseException:
            await _stop([*lanes.values(), *behind.values()])
            for future in done:
                if not future.done():
                    future.cancel()
            raise
        self._behind = {lane: t for lane, t in lanes.items() if not t.done()}
        return done

    async def _in_one_trip(self, enqueuer: Enqueuer, this: _Pass) -> dict[int, asyncio.Future[Completion]]:
        """Every task enqueued in graph order on the enqueueing thread, in one call; a cancelled
        pass stops before its next task and waits for the one being enqueued. Returns the
        completions the next pass orders after (its slots' releases and the uploads done ahead)."""
        graph, works, taken, before, step = this.graph, this.works, this.taken, this.before, this.step
        handles: dict[int, object] = {i: upload.result().handle for i, upload in taken.items()}
        waits = {i: release.result().handle for i, release in before.items()}
        issued: list[tuple[Task, float]] = []
        stop, clock = threading.Event(), self.clock

        def enqueue_pass() -> None:
            for task in graph.tasks:
                if task.index in handles:
                    continue
                if stop.is_set():
                    return
                after = [handles[dep] for dep in task.deps]
                if task.index in waits:
                    after.append(waits[task.index])
                issued.append((task, clock()))
                try:
                    handles[task.index] = enqueuer.enqueue(step, task, works[task.index], after)
                except Exception as error:
                    raise TaskFailed(step, task, error) from error

        trip = asyncio.ensure_future(enqueuer.call(enqueue_pass))
        try:
            await asyncio.shield(trip)
        except asyncio.CancelledError:
            stop.set()
            await asyncio.wait([trip])  # the thread cannot be interrupted: let it finish its task
            if not trip.cancelled():
                trip.exception()  # a failure of the task in flight is not reported over the cancellation
            raise
        finally:
            if self.instruments:
                for task, at in issued:
                    self.instruments.call("task_issued", step, task, at)
        loop = asyncio.get_running_loop()
        done: dict[int, asyncio.Future[Completion]] = {}  # only what the next pass waits on
        for index in (*graph.releases.values(), *(t.index for t in graph.ahead)):
            done[index] = loop.create_future()
            done[index].set_result(Completion(handle=handles[index]))
        return done

    def forget(self) -> None:
        """Drop what earlier passes left behind (their lanes' work, the slots' releases, uploads
        done ahead) once it can no longer be awaited: their event loop has ended. The next pass
        waits on nothing of theirs and uploads its first units itself; the caller first waits
        until the device has done all they enqueued."""
        self._behind, self._released, self._ahead = {}, {}, {}

    async def join(self) -> None:
        """Wait for the work left behind by earlier passes; raise its failure, if any."""
        behind, self._behind = self._behind, {}
        self._released, self._ahead = {}, {}
        try:
            await self._wait(None, [], behind)
        except BaseException:
            await _stop(list(behind.values()))
            raise

    @staticmethod
    async def _wait(
        graph: TaskGraph | None, done: list[asyncio.Future[Completion]], lanes: Mapping[Lane, asyncio.Task[None]]
    ) -> None:
        """Until the waited tasks are done (every lane, when ``graph`` waits for all); a lane that
        fails first raises its ``TaskFailed``."""
        waited = (
            list(lanes.values()) if graph is None or graph.waits is None else [done[i] for i in sorted(graph.waits)]
        )
        pending: set[asyncio.Future[Any]] = {*waited, *lanes.values()}
        while not all(f.done() for f in waited):
            finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for future in finished:
                if isinstance(future, asyncio.Task) and not future.cancelled() and future.exception() is not None:
                    error = future.exception()
                    assert error is not None
                    raise error

    async def _run_lane(
        self,
        lane: LaneRunner,
        tasks: Sequence[Task],
        done: list[asyncio.Future[Completion]],
        works: Mapping[int, Work],
        before: Mapping[int, asyncio.Future[Completion]],
        step: int,
        behind: asyncio.Task[None] | None,
    ) -> None:
        if behind is not None:
            await behind  # the lane's work from the pass before comes first
        hooks = self.instruments
        for task in tasks:
            after = []
            for dep in task.deps:
                after.append((await done[dep]).handle)
            if task.index in before:
                after.append((await before[task.index]).handle)
            if hooks:
                hooks.call("task_issued", step, task, self.clock())
            try:
                completion = await lane.run(step, task, works[task.index], after)
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


def _chain(source: asyncio.Future[Completion], target: asyncio.Future[Completion]) -> None:
    """Resolve ``target`` as ``source`` resolves (a failed or cancelled upload ahead: cancelled)."""

    def copy(future: asyncio.Future[Completion]) -> None:
        if target.done():
            return
        if future.cancelled() or future.exception() is not None:
            target.cancel()
        else:
            target.set_result(future.result())

    source.add_done_callback(copy)


async def _stop(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel lane coroutines and wait until each has stopped (a lane waits for its work in flight)."""
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    del results
