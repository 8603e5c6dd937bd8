"""A model as the planner sees it: one ``Workload`` for each unit its blocks can be cut into,
built from the model's configuration on the meta device (no weights touched). Shared by
``zoruntime plan`` and ``zoruntime train --policy fit=SIZE``; knows shapes and adapters, not
profiles or policies.
"""

from __future__ import annotations

from typing import Any

import torch

from .models.adapter import adapter_for
from .models.init import meta_model
from .models.shapes import shape_dims
from .planning.planner import Workload
from .policies.base import UNIT_KINDS
from .storage import model_layout


def workloads(
    config: Any,
    dtype: torch.dtype,
    batch: int,
    seq: int,
    directions: int = 1,
    estimator: str = "two-sided",
    compute_dtype: torch.dtype | None = None,
    cuda_graphs: bool = False,
    auto: bool = False,
) -> dict[str, Workload]:
    """The model of ``config`` (masters in ``dtype``, forwards in ``compute_dtype``, by default
    the same) cut into each unit it can be (whole blocks always; halves and linear layers where
    its blocks' forward can be paused between them), with a step's batch and directions (and
    ``cuda_graphs``: whole blocks' perturbed forwards replayed from CUDA graphs). ``auto``: the
    directions are ``directions="auto"``'s (``directions`` stands in until it decides), for which
    the runtime keeps the buffer of several directions' updates, whatever number it decides."""
    model, works, several = meta_model(config, dtype), {}, auto or directions != 1
    for unit in UNIT_KINDS:
        try:
            layout = model_layout(adapter_for(model, unit), compute_dtype or dtype, several_directions=several)
        except ValueError:  # blocks that route tokens (experts) stream whole
            continue
        works[unit] = Workload(layout, shape_dims(config), batch, seq, unit, config.num_hidden_layers, directions,
                               estimator, cuda_graphs)  # fmt: skip
    return works
