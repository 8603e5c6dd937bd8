"""Measuring on a device, for benchmarks: median times (CUDA events on a GPU, the host clock on a
CPU), peak allocated and device-wide used memory, and host buffers pinned in place.

Knows nothing about models or ZO.
"""

from __future__ import annotations

import gc
import platform
import statistics
import time
from collections.abc import Callable

import torch

from .cuda import pin_in_place


class DeviceMeter:
    def __init__(self, name: str) -> None:
        self.device = torch.device(name)
        self.cuda = self.device.type == "cuda"
        if self.cuda and not torch.cuda.is_available():
            raise SystemExit("--device cuda needs a CUDA GPU; none is visible (use --device cpu for a smoke run)")

    def describe(self) -> str:
        if self.cuda:
            return f"{torch.cuda.get_device_name(self.device)}, CUDA {torch.version.cuda}"
        return f"CPU {platform.machine()}"

    def host_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat host buffer, pinned at its exact size on CUDA."""
        flat = torch.empty(numel, dtype=dtype)
        return pin_in_place(flat) if self.cuda else flat

    def seconds(self, fn: Callable[[], object], repeat: int) -> float:
        """Median seconds of ``fn`` after one warm-up call (device-timed with events on CUDA; the
        start event is recorded behind the warm-up, so no host sync is needed)."""
        fn()
        times = []
        for _ in range(repeat):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def reset_peak(self) -> None:
        if self.cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_mb(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**20 if self.cuda else None

    def used_mb(self) -> float | None:
        """Device-wide used memory, as nvidia-smi counts it."""
        if not self.cuda:
            return None
        free, total = torch.cuda.mem_get_info(self.device)
        return (total - free) / 2**20

    def free_bytes(self) -> int | None:
        return torch.cuda.mem_get_info(self.device)[0] if self.cuda else None
