"""Measuring on a device, for benchmarks: median times (CUDA events on a GPU, the host clock on a
CPU), peak allocated and device-wide used memory, and host buffers pinned in place.

Knows nothing about models or ZO.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable, Sequence

import torch

from .cuda import pin_in_place


class DeviceMeter:
    def __init__(self, name: str) -> None:
        self.device = torch.device(name)
        self.cuda = self.device.type == "cuda"
        if self.cuda and not torch.cuda.is_available():
            raise SystemExit("--device cuda needs a CUDA GPU; none is visible (use --device cpu for a smoke run)")
        self._cycles: float | None = None

    def describe(self) -> str:
        if self.cuda:
            return f"{torch.cuda.get_device_name(self.device)}, CUDA {torch.version.cuda}"
        return f"CPU {platform.machine()}"

    def host_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat host buffer, pinned at its exact size on CUDA and unpinned when its memory is
        freed (when the storage goes, not the tensor: views of it, a model's weights, keep it)."""
        flat = torch.empty(numel, dtype=dtype)
        if not self.cuda:
            return flat
        pin_in_place(flat)
        weakref.finalize(flat.untyped_storage(), _unpin, flat.data_ptr(), self.device)  # the pointer, not the storage
        return flat

    def at_once(self, works: Sequence[Callable[[], object]]) -> Callable[[], None]:
        """One call that issues every work of ``works`` on a CUDA stream of its own, so they run
        at the same time (the current stream waits for all of them); on a CPU one after another."""
        if not self.cuda:

            def in_turn() -> None:
                for work in works:
                    work()

            return in_turn
        streams = [torch.cuda.Stream(self.device) for _ in works]

        def together() -> None:
            current = torch.cuda.current_stream(self.device)
            for stream, work in zip(streams, works, strict=True):
                stream.wait_stream(current)
                with torch.cuda.stream(stream):
                    work()
            for stream in streams:
                current.wait_stream(stream)

        return together

    def seconds(self, fn: Callable[[], object], repeat: int) -> float:
        """Median seconds the device spends on ``fn``, after one warm-up call.

        On CUDA the device is first kept busy (``torch.cuda._sleep``) for longer than the host
        takes to enqueue ``fn``, so the start event is reached only once all of ``fn``'s work is
        queued: the time is the GPU's alone, not the host's launch overhead (``enqueue_seconds``
        measures that). On a CPU it is the host clock around ``fn``.
        """
        fn()
        if not self.cuda:
            return statistics.median(_host_times(fn, repeat))
        cover = int(2 * self.enqueue_seconds(fn, repeat=3) * self._cycles_per_second()) + 1_000_000
        times = []
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(cover)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    def enqueue_seconds(self, fn: Callable[[], object], repeat: int) -> float:
        """Median host seconds to issue ``fn``. On CUDA the device is kept busy meanwhile, so
        this is the launch overhead alone: when it exceeds ``seconds(fn)`` the host, not the GPU,
        sets the pace of a lane that runs ``fn``."""
        if not self.cuda:
            return statistics.median(_host_times(fn, repeat))
        busy = int(0.05 * self._cycles_per_second())  # 50 ms of device work ahead of the host
        times = []
        for _ in range(repeat):
            torch.cuda.synchronize(self.device)
            torch.cuda._sleep(busy)
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        torch.cuda.synchronize(self.device)
        return statistics.median(times)

    def _cycles_per_second(self) -> float:
        if self._cycles is None:
            cycles = 10_000_000
            torch.cuda._sleep(cycles)  # warm up
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(cycles)
            end.record()
            end.synchronize()
            self._cycles = cycles / (start.elapsed_time(end) / 1e3)
        return self._cycles

    def release(self) -> None:
        """Return the memory of what is no longer referenced (between runs), and reset the peak."""
        gc.collect()
        if self.cuda:
            _clear_blas_workspaces(self.device)  # each run's peak counts the workspaces its own streams take
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def reset_peak(self) -> None:
        """Start the peak over, keeping the allocator's cache (inside a run: no new cudaMalloc)."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mb(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else None

    def used_mb(self) -> float | None:
        """Device-wide used memory, as nvidia-smi counts it."""
        if not self.cuda:
            return None
        free, total = torch.cuda.mem_get_info(self.device)
        return (total - free) / 2**20

    def blas_workspace_bytes(self, dtype: torch.dtype) -> int:
        """Bytes a stream's first matmuls leave allocated, as a block runs them (``dtype``, with
        and without a bias): cuBLAS's workspace, which PyTorch takes from its caching allocator
        once per stream and keeps (cuBLASLt's too, where it has its own). 0 on a CPU."""
        if not self.cuda:
            return 0
        weight = torch.ones(64, 64, dtype=dtype, device=self.device)
        bias = torch.ones(64, dtype=dtype, device=self.device)
        _clear_blas_workspaces(self.device)
        before = torch.cuda.memory_allocated(self.device)
        outputs = [weight @ weight, torch.nn.functional.linear(weight, weight, bias)]
        torch.cuda.synchronize(self.device)
        return torch.cuda.memory_allocated(self.device) - before - sum(o.nbytes for o in outputs)

    def free_bytes(self) -> int | None:
        return torch.cuda.mem_get_info(self.device)[0] if self.cuda else None

    def total_bytes(self) -> int:
        """The compute device's memory: the GPU's, or on a CPU the host's physical memory."""
        if self.cuda:
            return int(torch.cuda.mem_get_info(self.device)[1])
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _clear_blas_workspaces(device: torch.device) -> None:
    """Free cuBLAS's workspaces, every stream's (once the device is idle: a kernel may use one)."""
    torch.cuda.synchronize(device)
    torch._C._cuda_clearCublasWorkspaces()


def _unpin(pointer: int, device: torch.device) -> None:
    """Unregister a buffer pinned in place when its storage is freed. A copy enqueued from it may
    still be running, so the device is waited for first: never inside a runtime's step, since a
    runtime holds the buffers it copies from until it closes (after its last flush)."""
    torch.cuda.synchronize(device)
    torch.cuda.cudart().cudaHostUnregister(pointer)


def _host_times(fn: Callable[[], object], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times
