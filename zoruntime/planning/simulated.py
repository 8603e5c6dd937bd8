"""The simulated backend: a virtual clock and lanes that only wait, for scheduling tests and
what-if planning. No tensors, no threads.

``VirtualClockLoop`` is an asyncio event loop whose time is virtual: whenever every coroutine
is waiting, it jumps straight to the next timer instead of sleeping (trio's autojump clock).
A simulated lane "runs" a task by sleeping its duration on that clock, so the real scheduler
runs unchanged and a 96-block step takes milliseconds of real time. A graph that deadlocks
raises instead of hanging.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from ..runtime.graph import Lane, Task
from ..runtime.scheduler import Completion, Work

T = TypeVar("T")


class SimulationDeadlock(RuntimeError):
    """Every coroutine waits and no timer is pending: the simulated graph can never finish."""


class _JumpingSelector(selectors.DefaultSelector):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise SimulationDeadlock("every task waits and no timer is pending: the simulated graph deadlocked")
        if timeout is not None and timeout > 0:
            self.now += timeout
        return super().select(0)


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time, starting at 0.0 seconds."""

    def __init__(self) -> None:
        self._jumping = _JumpingSelector()
        super().__init__(self._jumping)

    def time(self) -> float:
        return self._jumping.now

    def run_simulation(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` to completion; on a deadlock, cancel it, let it unwind, and raise."""
        main = self.create_task(coro)
        try:
            return self.run_until_complete(main)
        except SimulationDeadlock:
            main.cancel()  # wakes every waiting task, so unwinding needs no timer
            self.run_until_complete(asyncio.gather(main, return_exceptions=True))
            raise


Durations = Callable[[int, Task], float]
"""Seconds a task of a step (the pass that issued it) takes on its lane."""


class SimulatedLane:
    """Runs a task by waiting its duration on the running loop's clock."""

    def __init__(self, durations: Durations) -> None:
        self.durations = durations

    async def run(self, step: int, task: Task, work: Work, after: Sequence[object]) -> Completion:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.sleep(self.durations(step, task))
        return Completion(started, loop.time())


def simulated_lanes(durations: Durations) -> dict[Lane, SimulatedLane]:
    return {lane: SimulatedLane(durations) for lane in Lane}
