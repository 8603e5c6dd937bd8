"""The causal-LM data: a token stream cut into fixed-length rows.

Training batches are windows at positions drawn from ``random.Random(seed + step)``, so batch
``k`` is the same whatever happened before it (a resumed run sees the same data). The dev set
is the stream cut into consecutive rows, the first ``max_rows`` of them (64: the same rows at
every evaluation, about 4 training steps' worth of a batch of 8). Knows nothing about models or
runtimes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..models.batch import LossFn
from .tasks import Metric


@dataclass(frozen=True)
class LMData:
    train_ids: list[int]
    dev_ids: list[int]
    max_length: int
    batch_size: int
    seed: int = 0
    rows_per_example: ClassVar[int] = 1

    @property
    def loss_fn(self) -> LossFn | None:
        """The causal-LM loss (as a ``data.tasks.Task``)."""
        return None

    @property
    def metric(self) -> Metric | None:
        return None

    def __post_init__(self) -> None:
        for name, ids in (("training", self.train_ids), ("dev", self.dev_ids)):
            if len(ids) < self.max_length + 1:
                raise ValueError(
                    f"the {name} text has {len(ids)} tokens, fewer than one row of --max-length {self.max_length}; "
                    "give more text or a smaller --max-length"
                )

    def train_batch(self, step: int) -> dict[str, torch.Tensor]:
        rng = random.Random(self.seed * 1_000_003 + step)
        last = len(self.train_ids) - self.max_length
        rows = [
            self.train_ids[s : s + self.max_length] for s in (rng.randrange(last + 1) for _ in range(self.batch_size))
        ]
        return {"input_ids": torch.tensor(rows)}

    def dev_batches(self, max_rows: int = 64) -> list[dict[str, torch.Tensor]]:
        rows = [
            self.dev_ids[s : s + self.max_length]
            for s in range(0, len(self.dev_ids) - self.max_length + 1, self.max_length)
        ][:max_rows]
        return [
            {"input_ids": torch.tensor(rows[i : i + self.batch_size])} for i in range(0, len(rows), self.batch_size)
        ]
