"""Prefetch-depth and placement policies (frozen data, pure functions) and the cost model."""

from .base import FixedDepth, MemoryBudget, ModelLayout, Plan, Policy, slots_for_depth, spread
from .cost import CostModel, OpFigures

__all__ = [
    "CostModel",
    "FixedDepth",
    "MemoryBudget",
    "ModelLayout",
    "OpFigures",
    "Plan",
    "Policy",
    "slots_for_depth",
    "spread",
]
