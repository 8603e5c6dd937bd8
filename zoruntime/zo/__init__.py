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
from .estimator import OneSidedEstimator, TwoSidedEstimator, coefficients
from .stats import StepStats
from .update import PendingUpdate, apply_update, perturb_into, projected_gradient, update_group

__all__ = [
    "CHUNK_ELEMENTS",
    "DIRECTION_SCHEME",
    "RESIDENT_GROUP",
    "ZOSGD",
    "DirectionSampler",
    "LRSchedule",
    "OneSidedEstimator",
    "PendingUpdate",
    "StepStats",
    "TwoSidedEstimator",
    "apply_update",
    "block_group",
    "chunk_seed",
    "coefficients",
    "perturb_into",
    "projected_gradient",
    "step_seed",
    "update_group",
]
