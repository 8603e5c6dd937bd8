"""ZO-SGD hyper-parameters: a frozen, validated record.

Knows the optimiser's numbers (learning rate and its schedule, perturbation scale, weight
decay, base seed) and how a step's seed is derived from the base seed. Knows nothing about
models, devices or scheduling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

LRSchedule = Callable[[int], float]
"""Maps a step index (0-based) to that step's learning rate."""


def _check_lr(lr: float, where: str) -> None:
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"{where} must be a finite number >= 0, got {lr!r}; pass e.g. lr=1e-6")


@dataclass(frozen=True, slots=True)
class ZOSGD:
    """Zeroth-order SGD (MeZO): ``θ ← θ − lr·(g·z + wd·θ)`` with ``g = (f(θ+εz) − f(θ−εz)) / 2ε``.

    ``weight_decay`` is skipped for biases and layer norms. ``lr_schedule``, when given,
    replaces ``lr`` with ``lr_schedule(step)`` for each step.
    """

    lr: float = 1e-6
    eps: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    lr_schedule: LRSchedule | None = None

    def __post_init__(self) -> None:
        _check_lr(self.lr, "lr")
        if not math.isfinite(self.eps) or self.eps <= 0:
            raise ValueError(f"eps must be a finite number > 0, got {self.eps!r}; pass e.g. eps=1e-3")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")

    def lr_at(self, step: int) -> float:
        """The learning rate of ``step``, checked: a schedule returning a bad value fails loudly."""
        if self.lr_schedule is None:
            return self.lr
        lr = float(self.lr_schedule(step))
        _check_lr(lr, f"lr_schedule({step})")
        return lr
