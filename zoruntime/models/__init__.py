"""Model adapters: a HF model seen as a table of units over flat groups (OPT first)."""

from .adapter import ADAPTERS, ModelAdapter, adapter_for
from .batch import IGNORE_INDEX, Batch, LossFn, make_batch
from .groups import GroupLayout, ParamSlice, adopt_into_flat
from .init import random_opt, tiny_opt_config
from .opt import OPTAdapter, StageInputs

__all__ = [
    "ADAPTERS",
    "IGNORE_INDEX",
    "Batch",
    "GroupLayout",
    "LossFn",
    "ModelAdapter",
    "OPTAdapter",
    "ParamSlice",
    "StageInputs",
    "adapter_for",
    "adopt_into_flat",
    "make_batch",
    "random_opt",
    "tiny_opt_config",
]
