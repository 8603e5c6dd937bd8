"""ZO-SGD hyper-parameters: a frozen, validated record.

Knows the optimiser's numbers (learning rate and its schedule, perturbation scale, weight
decay, base seed, how 16-bit masters round) and how a step's seed is derived from the base seed. Knows nothing about
models, devices or scheduling.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..planning.directions import too_few_directions
from .estimator import ESTIMATORS
from .update import Rounding

LRSchedule = Callable[[int], float]
"""Maps a step index (0-based) to that step's learning rate."""


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_lr(lr: float, where: str) -> None:
    if not _is_number(lr) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"{where} must be a finite number >= 0, got {lr!r}; pass e.g. lr=1e-6")


@dataclass(frozen=True, slots=True)
class ZOSGD:
    """Zeroth-order SGD (MeZO): ``θ ← θ − lr·(g·z + wd·θ)`` with ``g = (f(θ+εz) − f(θ−εz)) / 2ε``.

    ``directions`` (q) and ``estimator`` use several directions per step, hence per upload of
    each block: "two-sided" averages q such estimates (2q forwards); "one-sided" runs the
    forward at θ once and one at ``θ + εz_d`` per direction (q + 1 forwards, q >= 3), its step
    normalised by the spread of their losses (after FZOO; ``zo/estimator.py`` says exactly
    what). ``directions="auto"``: the largest q whose forwards still hide under the transfers
    of the runtime's plan (decided at its first step; ``planning/directions.py``). q = 1
    two-sided is MeZO's step.

    ``weight_decay`` is skipped for biases and layer norms, and folded into the step before it
    is rounded. ``lr_schedule``, when given, replaces ``lr`` with ``lr_schedule(step)`` for
    each step. ``rounding``: how 16-bit master weights take an update, "stochastic" (the
    default for them: an update far below half a 16-bit step still moves the weight on
    average) or "nearest" (most such updates round away); float32 masters round to nearest.
    """

    lr: float = 1e-6
    eps: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    lr_schedule: LRSchedule | None = None
    rounding: str | None = None  # None: "stochastic" for 16-bit masters, "nearest" for float32
    directions: int | str = 1  # or "auto"
    estimator: str = "two-sided"  # or "one-sided"

    def rounding_for(self, master: torch.dtype) -> Rounding:
        """The rounding the updates of ``master`` weights use (a clear error if it cannot apply)."""
        if master not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(
                f"zoruntime trains float32, float16 or bfloat16 master weights; these are {master}: convert the model "
                "first (model.float(), model.half() or model.bfloat16())"
            )
        if self.rounding is None:
            return Rounding.NEAREST if master == torch.float32 else Rounding.STOCHASTIC
        rounding = Rounding(self.rounding)
        if rounding is Rounding.STOCHASTIC and master == torch.float32:
            raise ValueError(
                "rounding='stochastic' is for 16-bit master weights; these are float32, whose updates round to "
                "nearest: leave rounding unset (or 'nearest'), or load the model in float16 or bfloat16"
            )
        return rounding

    def __post_init__(self) -> None:
        _check_lr(self.lr, "lr")
        if not _is_number(self.eps) or not math.isfinite(self.eps) or self.eps <= 0:
            raise ValueError(f"eps must be a finite number > 0, got {self.eps!r}; pass e.g. eps=1e-3")
        if not _is_number(self.weight_decay) or not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be 'two-sided' or 'one-sided', got {self.estimator!r}")
        q = self.directions
        if q != "auto" and (not isinstance(q, int) or isinstance(q, bool) or q < 1):
            raise ValueError(f"directions must be an int >= 1 or 'auto', got {q!r}")
        if isinstance(q, int) and (why := too_few_directions(self.estimator, q)) is not None:
            raise ValueError(why)
        if self.rounding is not None and self.rounding not in tuple(Rounding):
            raise ValueError(
                f"rounding must be 'stochastic', 'nearest' or None (by the masters' dtype), got {self.rounding!r}"
            )

    def lr_at(self, step: int) -> float:
        """The learning rate of ``step``, checked: a schedule returning a bad value fails loudly."""
        if self.lr_schedule is None:
            return self.lr
        value = self.lr_schedule(step)
        try:  # a float, or a 0-d tensor or numpy scalar
            lr = float(value) if not isinstance(value, str | bool) else math.nan
        except (TypeError, ValueError, RuntimeError):
            lr = math.nan
        if math.isnan(lr):
            raise ValueError(f"lr_schedule({step}) must return a number, got {value!r}")
        _check_lr(lr, f"lr_schedule({step})")
        return lr
