"""Model adapters: a HF model seen as embedding stage, decoder blocks and head (OPT first)."""

from .batch import IGNORE_INDEX, Batch, make_batch
from .groups import GroupLayout, ParamSlice, adopt_into_flat
from .init import random_opt, tiny_opt_config
from .opt import LossFn, OPTAdapter, StageInputs

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "GroupLayout",
    "LossFn",
    "OPTAdapter",
    "ParamSlice",
    "StageInputs",
    "adopt_into_flat",
    "make_batch",
    "random_opt",
    "tiny_opt_config",
]
