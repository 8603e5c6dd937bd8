"""The CPU backend: host storage and compute-side buffers are separate CPU tensors, and each
lane (upload, compute, offload) is a worker thread, so copies and compute overlap.

Used for tests, for exactness against the in-memory reference, and to run the runtime where
no GPU exists. Knows nothing about models or ZO.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch

from ..runtime.graph import Lane, Task
from .threads import thread_lanes


class CPUBackend:
    completes_on_enqueue = False  # a thread lane's task is done when its work has run

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.device = torch.device("cpu")
        self.clock = clock
        self._lanes = thread_lanes(clock)
        self.lanes = dict(self._lanes)

    def host_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype)

    def host_adopt(self, flat: torch.Tensor) -> torch.Tensor:
        return flat

    def compute_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(numel, dtype=dtype)

    def staged(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def free_bytes(self) -> int | None:
        return None  # host memory: the operating system decides

    def ready(self) -> None:
        return None

    async def drain(self, lanes: Iterable[Lane] | None = None) -> None:
        return None

    def begin_step(self, step: int) -> None:
        return None

    def take_timings(self) -> list[tuple[int, Task, float, float]]:
        return []

    def close(self) -> None:
        for lane in self._lanes.values():
            lane.close()
