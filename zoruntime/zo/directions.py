"""Addressable random directions: z for (step seed, group id) is a pure function of the two.

Knows how seeds are derived and how one direction is drawn: a single ``torch.randn`` per
group from a private ``torch.Generator`` re-seeded for that draw, on the device where the
group lives. Never touches the global RNG, so the order in which groups are visited, and
anything else the program draws, cannot change z. Knows nothing about models or schedules.
"""

from __future__ import annotations

import numpy as np
import torch

RESIDENT_GROUP = 0
"""Group id of everything that stays on the compute device (embeddings, final norm, head)."""


def block_group(index: int) -> int:
    """Group id of decoder block ``index``."""
    return index + 1


def _mix(*words: int) -> int:
    # SeedSequence hashes its entropy words thoroughly: nearby inputs give unrelated outputs.
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & (2**63 - 1)


def step_seed(base_seed: int, step: int) -> int:
    """Seed of step ``step`` of a run started with ``base_seed`` (a 63-bit int)."""
    return _mix(base_seed, step, 0x5EED)


def group_seed(seed: int, group: int) -> int:
    """Seed of the direction of ``group`` in the step whose seed is ``seed``."""
    return _mix(seed, group, 0x6209)


class DirectionSampler:
    """Draws z into caller-owned buffers; one sampler per device, used by one thread at a time."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._generator = torch.Generator(device=self.device)

    def draw(self, seed: int, group: int, out: torch.Tensor) -> torch.Tensor:
        """Fill ``out`` (flat, contiguous, on this sampler's device) with z for (seed, group)."""
        if out.device != self.device or out.dim() != 1 or not out.is_contiguous():
            raise ValueError(f"direction buffer must be flat and contiguous on {self.device}")
        self._generator.manual_seed(group_seed(seed, group))
        return torch.randn(out.shape, generator=self._generator, out=out)
