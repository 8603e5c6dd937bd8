"""Zeroth-order optimisation: config, addressable directions, arithmetic, the in-memory reference."""

from .config import ZOSGD, LRSchedule
from .directions import (
    CHUNK_ELEMENTS,
    DIRECTION_SCHEME,
    RESIDENT_GROUP,
    DirectionSampler,
    block_group,
    chunk_seed,
    step_seed,
)
from .stats import StepStats
from .update import PendingUpdate, apply_update, perturb_into, projected_gradient

__all__ = [
    "CHUNK_ELEMENTS",
    "DIRECTION_SCHEME",
    "RESIDENT_GROUP",
    "ZOSGD",
    "DirectionSampler",
    "LRSchedule",
    "PendingUpdate",
    "StepStats",
    "apply_update",
    "block_group",
    "chunk_seed",
    "perturb_into",
    "projected_gradient",
    "step_seed",
]
