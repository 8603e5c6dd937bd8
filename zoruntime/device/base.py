"""What a device backend provides to the runtime: lanes, a clock, and two kinds of memory.

Host memory holds the master weights (the model's own parameters, re-laid as flat group
buffers); compute memory holds the streaming slots, the resident blocks and the working
buffers. On the CPU backend both are ordinary CPU tensors (separate buffers); on CUDA, host
memory is pinned and compute memory is on the GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import torch

from ..runtime.graph import Lane, Task
from ..runtime.scheduler import Enqueuer, LaneRunner


class Backend(Protocol):
    device: torch.device
    clock: Callable[[], float]
    completes_on_enqueue: bool
    """True where a lane reports a task done once it is enqueued (CUDA): the work is done only
    after ``drain``, and the tasks' times come from ``take_timings``."""

    @property
    def lanes(self) -> Mapping[Lane, LaneRunner] | Enqueuer:
        """One runner per lane (upload, compute, offload), or one enqueuer that feeds them all a
        pass at a time (CUDA)."""
        ...

    def host_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat buffer for master weights."""
        ...

    def host_adopt(self, flat: torch.Tensor) -> torch.Tensor:
        """Make an existing flat host buffer usable as master storage (CUDA pins it in place)."""
        ...

    def compute_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat buffer on the compute device."""
        ...

    def staged(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor the compute lane can copy to the device without the host waiting (CUDA:
        a pinned copy; a tensor already on the device is returned as it is)."""
        ...

    def free_bytes(self) -> int | None:
        """Free memory on the compute device, where the backend can tell (None otherwise)."""
        ...

    def ready(self) -> None:
        """Order the lanes after set-up work done outside them (CUDA: streams wait for the default stream)."""
        ...

    async def drain(self, lanes: Iterable[Lane] | None = None) -> None:
        """Return once the work enqueued on ``lanes`` (all, by default) has completed (CPU lanes
        complete as they run)."""
        ...

    def begin_step(self, step: int) -> None:
        """Mark the start of a step (CUDA: the origin of its timing events)."""
        ...

    def take_timings(self) -> list[tuple[int, Task, float, float]]:
        """(step, task, start, end) of finished tasks whose times the lanes could not report at once."""
        ...

    def close(self) -> None:
        """Release lanes (threads, streams); waits for work in flight."""
        ...


def backend_for(device: str | torch.device, timing: bool) -> Backend:
    """The backend for ``device``: worker threads on a CPU, streams on a GPU."""
    kind = torch.device(device).type
    if kind == "cpu":
        from .cpu import CPUBackend

        return CPUBackend()
    if kind == "cuda":
        from .cuda import CUDABackend

        return CUDABackend(device, timing=timing)
    raise ValueError(f"device {str(device)!r} is not supported; use device='cuda' or device='cpu'")
