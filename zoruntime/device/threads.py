"""Thread lanes: each lane is one worker thread, so a copy on one lane and compute on another
really overlap (PyTorch releases the GIL inside its kernels).

A task completes when its work has run; its start and end are read from the clock inside
the thread. A cancelled lane waits for the work in flight to finish before it gives up, so a
failed or cancelled step leaves no work running behind it. Knows nothing about tensors.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from ..runtime.graph import Lane, Task
from ..runtime.scheduler import Completion, Work


class ThreadLane:
    """One worker thread running works in submission order."""

    def __init__(self, name: str, clock: Callable[[], float] = time.perf_counter) -> None:
        self.name = name
        self.clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"zoruntime-{name}")

    async def run(self, step: int, task: Task, work: Work, after: Sequence[object]) -> Completion:
        clock = self.clock

        def timed() -> tuple[float, float]:
            started = clock()
            work()
            return started, clock()

        future = asyncio.get_running_loop().run_in_executor(self._executor, timed)
        try:
            started, finished = await asyncio.shield(future)
        except asyncio.CancelledError:
            await asyncio.wait([future])  # the thread cannot be interrupted: let it finish first
            if not future.cancelled():
                future.exception()  # the step already failed elsewhere: this one is not reported twice
            raise
        return Completion(started, finished)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def thread_lanes(clock: Callable[[], float] = time.perf_counter) -> dict[Lane, ThreadLane]:
    return {lane: ThreadLane(lane.value, clock) for lane in Lane}
