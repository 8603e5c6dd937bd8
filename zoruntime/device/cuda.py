"""The CUDA backend: three streams under asyncio, pinned flat host storage, GPU-side ordering by events.

Each lane (upload, compute, offload) owns one CUDA stream; one thread enqueues the work of all
three, and the scheduler hands it a whole pass at once, in graph order. Running a task means,
on that thread: make the lane's stream wait for the events of the task's dependencies
(``wait_event``: the GPU orders the work, the host does not wait), enqueue the task's kernels
and copies, and record a completion event that dependants will wait on. One thread rather than
one a lane, and one trip to it a pass rather than one a task: every PyTorch call lets go of the
GIL and takes it back, and with other threads running Python (three enqueueing threads, or the
event loop scheduling the next task) each call of a compute task could wait behind them (on an
H200 a streamed unit's host time rose from 2.4 ms with nothing prefetched to 4.3 ms with
uploads and offloads enqueued beside it, 0.7 ms of it trips through the event loop). The host
runs ahead of the GPU by up to a whole step and blocks nowhere inside one. It waits only in
``drain`` (the step's result: the compute lane), in a waiter thread that sleeps on blocking
events (no spinning core, no blocked event loop).

Host memory for master weights is pinned once, in place and at its exact size
(``cudaHostRegister``; PyTorch's pinned allocator would round 600 MB up to 1 GB). With
``timing=True`` every task also records start and end timing events, turned into spans after
``drain``. Knows nothing about models or ZO.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from ..runtime.graph import Lane, Task
from ..runtime.scheduler import Work

T = TypeVar("T")


def pin_in_place(flat: torch.Tensor) -> torch.Tensor:
    """Page-lock a host tensor's memory at its exact size (``cudaHostRegister``)."""
    error = torch.cuda.cudart().cudaHostRegister(flat.data_ptr(), flat.numel() * flat.element_size(), 0)
    code = int(getattr(error, "value", error))
    if code != 0:
        raise RuntimeError(
            f"could not pin {flat.numel() * flat.element_size():,} bytes of host memory (CUDA error {code}); "
            "the machine may be short of lockable memory (ulimit -l)"
        )
    return flat


def _device_thread(device: torch.device, name: str) -> ThreadPoolExecutor:
    """One worker thread whose current device is ``device``: a thread starts on GPU 0, and under
    torchrun a rank's first CUDA call there would create a context on another rank's GPU."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=name, initializer=torch.cuda.set_device,
                              initargs=(device,))  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Timed:
    step: int
    task: Task
    start: torch.cuda.Event
    end: torch.cuda.Event


class StreamEnqueuer:
    """The three lanes' CUDA streams and the one thread that enqueues work on them; a task is
    complete, for the scheduler, once it is enqueued (``runtime.scheduler.Enqueuer``)."""

    def __init__(self, device: torch.device, backend: CUDABackend) -> None:
        self.streams = {lane: torch.cuda.Stream(device=device) for lane in Lane}
        self._backend = backend
        self._executor = _device_thread(device, "zoruntime-cuda-enqueue")

    def enqueue(self, step: int, task: Task, work: Work, after: Sequence[object]) -> torch.cuda.Event:
        stream = self.streams[task.lane]
        with torch.cuda.stream(stream):
            for event in after:  # every handle is an event this enqueuer recorded
                stream.wait_event(event)  # type: ignore[arg-type]
            start = self._backend.timing_event()
            work()
            done = torch.cuda.Event(enable_timing=start is not None)
            done.record(stream)
        if start is not None:
            self._backend.timed(step, task, start, done)
        return done

    async def call(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


class CUDABackend:
    """Lanes on three streams of ``device``; pinned host buffers; compute buffers on the GPU."""

    completes_on_enqueue = True  # the GPU runs a task after its lane has enqueued it

    def __init__(self, device: torch.device | str = "cuda", timing: bool = False) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError(
                "device='cuda' needs a CUDA GPU and a CUDA build of torch; none is visible here "
                "(torch.cuda.is_available() is False). Use device='cpu'."
            )
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.clock = time.perf_counter
        self.timing = timing
        self.lanes = StreamEnqueuer(self.device, self)
        self._streams = self.lanes.streams
        self._waiter = _device_thread(self.device, "zoruntime-cuda-waiter")
        self._registered: list[int] = []
        self._timed: list[_Timed] = []
        self._timed_lock = threading.Lock()
        self._origin: torch.cuda.Event | None = None

    # -- memory -------------------------------------------------------------------------------
    def host_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return self.host_adopt(torch.empty(numel, dtype=dtype))

    def host_adopt(self, flat: torch.Tensor) -> torch.Tensor:
        """Pin an existing host buffer in place (once; an alias of a pinned buffer is left alone)."""
        if flat.is_pinned():
            return flat
        self._registered.append(pin_in_place(flat).data_ptr())
        return flat

    def compute_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype, device=self.device)

    def staged(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory() if tensor.device.type == "cpu" else tensor

    # -- ordering -------------------------------------------------------------------------------
    def free_bytes(self) -> int | None:
        return int(torch.cuda.mem_get_info(self.device)[0])

    def ready(self) -> None:
        """Make every lane's stream wait for work enqueued so far on the current (default) stream."""
        current = torch.cuda.current_stream(self.device)
        for stream in self._streams.values():
            stream.wait_stream(current)

    async def drain(self, lanes: Iterable[Lane] | None = None) -> None:
        """Wait, without blocking the event loop or spinning, until the work enqueued so far on
        ``lanes`` (every lane by default) is done."""
        events = []
        for name in self._streams if lanes is None else lanes:
            event = torch.cuda.Event(blocking=True)
            event.record(self._streams[name])
            events.append(event)
        loop = asyncio.get_running_loop()
        for event in events:
            await loop.run_in_executor(self._waiter, event.synchronize)

    # -- timing ----------------------------------------------------------------------------------
    def begin_step(self, step: int) -> None:
        if self.timing:
            origin = torch.cuda.Event(enable_timing=True)
            origin.record(self._streams[Lane.COMPUTE])
            self._origin = origin
            self._origin_time = self.clock()

    def timing_event(self) -> torch.cuda.Event | None:
        if not self.timing:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def timed(self, step: int, task: Task, start: torch.cuda.Event, end: torch.cuda.Event) -> None:
        with self._timed_lock:
            self._timed.append(_Timed(step, task, start, end))

    def take_timings(self) -> list[tuple[int, Task, float, float]]:
        """Spans of the tasks finished since the last call, in seconds on the host clock (the GPU's
        times, placed by the step's origin event); tasks still running are kept for a later call."""
        with self._timed_lock:
            finished = [t.end.query() for t in self._timed]
            timed = [t for t, done in zip(self._timed, finished, strict=True) if done]
            self._timed = [t for t, done in zip(self._timed, finished, strict=True) if not done]
        if not timed or self._origin is None:
            return []
        origin, base = self._origin, self._origin_time
        return [
            (t.step, t.task, base + origin.elapsed_time(t.start) / 1e3, base + origin.elapsed_time(t.end) / 1e3)
            for t in timed
        ]

    def close(self) -> None:
        self.lanes.close()
        self._waiter.shutdown(wait=True)
        # Outside any step: a failed step may have left copies in flight, and unpinning the host
        # buffers under a running DMA would be unsafe.
        torch.cuda.synchronize(self.device)
        for pointer in self._registered:
            torch.cuda.cudart().cudaHostUnregister(pointer)
        self._registered.clear()
        torch.cuda.empty_cache()  # the runtime dropped its buffers before closing the backend
