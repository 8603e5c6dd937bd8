"""Prefetch and placement policies: frozen data and pure functions, no torch.

A policy looks at the shape of the model (how many blocks, how many bytes each) and returns
a ``Plan``: how many uploads may run ahead of the block being computed (``depth``) and which
blocks stay on the compute device for the whole run (``resident``). The runtime turns a plan
into a task graph (``zoruntime.runtime.graph``); a policy knows nothing about tasks, lanes,
devices or tensors.

Writing your own: any object with ``plan(layout: ModelLayout) -> Plan`` is a policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class ModelLayout:
    """What a policy may know about the model: block count, bytes per block, working buffers.

    ``working_blocks`` is how many block-sized buffers the compute side needs besides the
    slots and resident blocks (the perturbed copy and the direction).
    """

    num_blocks: int
    block_bytes: int
    working_blocks: int = 2


@dataclass(frozen=True, slots=True)
class Plan:
    """``depth``: uploads in flight ahead of the computing block; ``resident``: blocks never streamed.

    Depth 0 is fully serial (one slot: upload, compute and offload of a block, then the next).
    Depth k >= 1 keeps ``k + 2`` slots: k blocks prefetched, one computing, one offloading.
    Depth 1 is Algorithm 1 of ZO2.
    """

    depth: int
    resident: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if not isinstance(self.depth, int) or isinstance(self.depth, bool) or self.depth < 0:
            raise ValueError(
                f"prefetch depth must be an int >= 0 (0 = serial, 1 = ZO2's Algorithm 1), got {self.depth!r}"
            )

    def streamed(self, num_blocks: int) -> list[int]:
        """Blocks uploaded and offloaded every step, in model order."""
        return [b for b in range(num_blocks) if b not in self.resident]

    def slots(self, num_blocks: int) -> int:
        """Compute-side block buffers used for streaming."""
        streamed = len(self.streamed(num_blocks))
        return min(streamed, slots_for_depth(self.depth))

    def validate(self, num_blocks: int) -> None:
        bad = sorted(b for b in self.resident if not 0 <= b < num_blocks)
        if bad:
            raise ValueError(f"resident blocks {bad} do not exist: the model has blocks 0..{num_blocks - 1}")


def slots_for_depth(depth: int) -> int:
    """Streaming slots needed at a prefetch depth (one for serial, k + 2 for depth k >= 1)."""
    return 1 if depth == 0 else depth + 2


@runtime_checkable
class Policy(Protocol):
    """Anything with ``plan``; called once when the runtime opens."""

    def plan(self, layout: ModelLayout) -> Plan: ...


@dataclass(frozen=True, slots=True)
class FixedDepth:
    """Stream every block with ``depth`` uploads running ahead (0 = serial, 1 = ZO2's Algorithm 1)."""

    depth: int = 1

    def __post_init__(self) -> None:
        Plan(self.depth)  # validates

    def plan(self, layout: ModelLayout) -> Plan:
        return Plan(self.depth)


def spread(count: int, num_blocks: int) -> frozenset[int]:
    """``count`` block indices spread evenly over ``range(num_blocks)``.

    Even spacing keeps the upload lane busy: between two streamed blocks the compute lane has
    the resident blocks to work on, instead of a run of resident blocks that starves uploads.
    """
    if count >= num_blocks:
        return frozenset(range(num_blocks))
    return frozenset(int((i + 0.5) * num_blocks / count) for i in range(count))


@dataclass(frozen=True, slots=True)
class MemoryBudget:
    """Keep as many blocks resident as ``budget_bytes`` allows beside the streaming slots.

    The budget covers the compute-side block buffers: resident blocks, ``slots`` for the
    prefetch depth and the working buffers. When every block fits, nothing is streamed.
    """

    budget_bytes: int
    depth: int = 1

    def __post_init__(self) -> None:
        Plan(self.depth)
        if not isinstance(self.budget_bytes, int) or self.budget_bytes < 0:
            raise ValueError(f"memory budget must be a whole number of bytes >= 0, got {self.budget_bytes!r}")

    def plan(self, layout: ModelLayout) -> Plan:
        n, size = layout.num_blocks, layout.block_bytes
        buffers = self.budget_bytes // size - layout.working_blocks
        if buffers >= n:
            return Plan(self.depth, frozenset(range(n)))
        slots = min(n, slots_for_depth(self.depth))
        resident = buffers - slots
        if resident < 0:
            need = (slots + layout.working_blocks) * size
            raise ValueError(
                f"memory budget of {self.budget_bytes:,} bytes is too small: depth {self.depth} streams through "
                f"{slots} slots plus {layout.working_blocks} working buffers of {size:,} bytes each, "
                f"{need:,} bytes in all; raise the budget to at least that or lower the depth"
            )
        return Plan(self.depth, spread(resident, n))
