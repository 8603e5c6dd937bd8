"""Prefetch-depth and placement policies (frozen data, pure functions); the models they plan with
live in ``zoruntime.planning`` and are re-exported here."""

from ..planning.cost import CostModel, OpFigures
from ..planning.memory import ModelLayout
from .base import FixedDepth, MemoryBudget, Plan, Policy, out_of_memory_advice, slots_for_depth, spread

__all__ = [
    "CostModel",
    "FixedDepth",
    "MemoryBudget",
    "ModelLayout",
    "OpFigures",
    "Plan",
    "Policy",
    "out_of_memory_advice",
    "slots_for_depth",
    "spread",
]
