"""What a device backend provides to the runtime: lanes, a clock, and two kinds of memory.

Host memory holds the master weights (the model's own parameters, re-laid as flat group
buffers); compute memory holds the streaming slots, the resident blocks and the working
buffers. On the CPU backend both are ordinary CPU tensors (separate buffers); on CUDA, host
memory is pinned and compute memory is on the GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import torch

from ..runtime.graph import Lane
from ..runtime.scheduler import LaneRunner


class Backend(Protocol):
    device: torch.device
    clock: Callable[[], float]

    @property
    def lanes(self) -> Mapping[Lane, LaneRunner]:
        """One runner per lane (upload, compute, offload)."""
        ...

    def host_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat buffer for master weights."""
        ...

    def compute_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat buffer on the compute device."""
        ...

    def close(self) -> None:
        """Release lanes (threads, streams); waits for work in flight."""
        ...
