"""Data-parallel ZO over ``torch.distributed``: the few scalars that cross ranks each step.

Every rank uses the same step seed, so every rank draws the same z; it runs every probe's
forward on its own shard of the global batch and contributes each probe's ``loss · w`` and ``w``,
where ``w`` is how many loss terms its shard holds (predicted tokens for the causal LM, rows for
a custom loss). One all-reduce of those float64 numbers (24 bytes for MeZO's two probes) gives
every rank the global losses, hence the same projected gradients and the same update: the
weights stay bitwise identical across ranks without ever being communicated.
``directions="auto"`` is decided on each rank and the ranks take the largest (``agreed_max``),
so they run the same probes even when their shards differ by a row. NCCL on GPUs, gloo on CPUs;
``torchrun`` launches. Knows nothing about models or schedules.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .models.batch import IGNORE_INDEX, Batch


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) unless ``torch.distributed`` is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_environment(device: str) -> tuple[int, int, int]:
    """Initialise the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1): NCCL for
    ``cuda``, gloo otherwise. Returns (rank, world size, local rank)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    rank, size = world()
    return rank, size, local


def causal_lm_weight(batch: Batch) -> torch.Tensor:
    """The number of predicted tokens: labels (shifted by one) that are not -100."""
    return (batch.labels[:, 1:] != IGNORE_INDEX).sum()


def row_weight(batch: Batch) -> torch.Tensor:
    """The number of rows, made where the batch is (a fill, not a blocking copy from the host)."""
    return torch.full((), batch.input_ids.shape[0], dtype=torch.long, device=batch.input_ids.device)


class LossReducer:
    """All-reduces per-rank mean losses into global ones, weighting each rank by its loss terms."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.bytes_reduced = 0

    def global_means(self, values: list[torch.Tensor], weight: torch.Tensor) -> list[torch.Tensor]:
        """``sum_r(value_r · w_r) / sum_r(w_r)`` for each value, from one all-reduce; a rank of
        weight 0 (a shard with nothing to score, whose mean is nan) adds nothing."""
        w = weight.to(torch.float64)
        packed = torch.stack([*(torch.where(w > 0, v.to(torch.float64) * w, 0.0) for v in values), w])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.group)
        self.bytes_reduced += packed.numel() * packed.element_size()
        return [(packed[i] / packed[-1]).to(torch.float32) for i in range(len(values))]


def agreed_max(value: int, device: torch.device) -> int:
    """The largest ``value`` over the ranks (one all-reduce of one number)."""
    packed = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return int(packed.item())


def shard(batch: dict[str, torch.Tensor], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """This rank's part of a global batch: examples ``rank, rank + world, ...``.

    An example is one row, or, when the batch has a per-example ``label`` (candidate scoring),
    the group of consecutive rows that belong to it.
    """
    if world_size == 1:
        return batch
    rows = batch["input_ids"].shape[0]
    examples = batch["label"].shape[0] if "label" in batch else rows
    per = rows // examples
    mine = torch.arange(rank, examples, world_size)
    row_index = (mine[:, None] * per + torch.arange(per)[None]).reshape(-1)
    out = {}
    for key, value in batch.items():
        if value.dim() and value.shape[0] == rows:
            out[key] = value[row_index]
        elif value.dim() and value.shape[0] == examples:
            out[key] = value[mine]
        else:
            out[key] = value
    return out


def examples_in(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["label"].shape[0]) if "label" in batch else int(batch["input_ids"].shape[0])
