"""Planning without a device: the memory model, the cost model and the simulator. No torch."""

from .cost import CostModel, OpFigures
from .memory import GroupSize, MemoryBreakdown, ModelLayout

__all__ = ["CostModel", "GroupSize", "MemoryBreakdown", "ModelLayout", "OpFigures"]
