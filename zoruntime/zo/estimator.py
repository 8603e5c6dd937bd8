"""The ZO estimators: which perturbed copies a step evaluates, and how their losses become
projected gradients and the step's coefficients.

A probe is one evaluation of the model: weights ``θ + scale·z_d`` for direction index ``d``
(scale 0: the weights themselves). A step with ``q`` directions updates
``θ ← θ − lr·(Σ_d c_d·z_d + wd·θ)``; ``coefficients`` turns the projected gradients ``g_d`` into
the ``c_d``, a pure function of the ``g_d`` and the estimator's name, so a replay rebuilds the
update from a journal's ``g_d`` alone.

- ``TwoSidedEstimator`` (MeZO's SPSA, n-SPSA for ``q > 1``: MeZO's appendix): each direction at
  ``+ε`` and ``−ε`` (2q forwards), ``g_d = (L+_d − L−_d) / 2ε``, ``c_d = g_d / q``. With
  ``q = 1`` it is exactly MeZO's step: ``c_0 = g_0``.
- ``OneSidedEstimator`` (after FZOO: Dang et al., "FZOO: Fast Zeroth-Order Optimizer for
  Fine-Tuning Large Language Models towards Adam-Scale Speed", 2025, arXiv 2506.09034): one
  forward at θ and one at ``θ + ε·z_d`` per direction (q + 1 forwards), ``g_d = (L_d − L_0) / ε``,
  and the step normalised by the spread of the perturbed losses: ``c_d = g_d / (q·σ)`` with
  ``σ`` the sample standard deviation (q − 1 in the denominator) of the ``g_d``. FZOO divides
  by the standard deviation of the losses ``L_d`` themselves; that is ``ε·σ``, so our ``lr`` is
  FZOO's ``η / ε`` and keeps its meaning when ε changes. FZOO draws Rademacher directions; ours
  stay Gaussian (the direction scheme of ``directions.py``). σ of two directions makes the step
  unstable, so ``q ≥ 3`` (``planning.directions.ONE_SIDED_FEWEST``).

Knows nothing about models, devices or scheduling; the task work runs the probes and hands
back the losses, in probe order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..planning.directions import too_few_directions
from .update import projected_gradient

ESTIMATORS = ("two-sided", "one-sided")


@dataclass(frozen=True, slots=True)
class Probe:
    """Evaluate the model at ``θ + scale·z``, z the step's direction ``direction`` (scale 0: at θ)."""

    direction: int
    scale: float

    @property
    def perturbed(self) -> bool:
        return self.scale != 0.0


UNPERTURBED = (Probe(0, 0.0),)
"""The probes of an evaluation: the weights themselves."""


class Estimator(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def eps(self) -> float: ...

    @property
    def directions(self) -> int: ...

    def probes(self) -> tuple[Probe, ...]: ...

    def projected_gradients(self, losses: Sequence[torch.Tensor]) -> torch.Tensor: ...


def _exact(eps: float, compute_dtype: torch.dtype) -> float:
    """``eps`` rounded to ``compute_dtype``: a 16-bit add rounds its scale, so g divides by what was
    applied. One that rounds to 0 (no perturbation at all, every g 0/0) is refused."""
    exact = float(torch.tensor(eps, dtype=compute_dtype))
    if exact == 0:
        tiny = torch.finfo(compute_dtype).smallest_normal
        raise ValueError(f"eps {eps:g} rounds to 0 in {compute_dtype}, so nothing would be perturbed: give a larger "
                         f"eps (its smallest normal number is {tiny:g}; MeZO uses 1e-3)")  # fmt: skip
    return exact


@dataclass(frozen=True, slots=True)
class TwoSidedEstimator:
    """``directions`` directions, each probed at ``+eps`` and ``−eps``: ``g_d = (L+_d − L−_d) / 2·eps``."""

    eps: float
    directions: int = 1
    name: str = "two-sided"

    @classmethod
    def exact(cls, eps: float, compute_dtype: torch.dtype, directions: int = 1) -> TwoSidedEstimator:
        return cls(_exact(eps, compute_dtype), directions)

    def probes(self) -> tuple[Probe, ...]:
        return tuple(Probe(d, s) for d in range(self.directions) for s in (self.eps, -self.eps))

    def projected_gradients(self, losses: Sequence[torch.Tensor]) -> torch.Tensor:
        """One projected gradient per direction from the probes' losses (a 1-d fp32 tensor on
        their device: no host sync)."""
        return torch.stack([projected_gradient(losses[2 * d], losses[2 * d + 1], self.eps)
                            for d in range(self.directions)])  # fmt: skip


@dataclass(frozen=True, slots=True)
class OneSidedEstimator:
    """One probe at θ, then one at ``+eps`` per direction: ``g_d = (L_d − L_0) / eps``."""

    eps: float
    directions: int
    name: str = "one-sided"

    def __post_init__(self) -> None:
        why = too_few_directions(self.name, self.directions)
        if why is not None:
            raise ValueError(why)

    @classmethod
    def exact(cls, eps: float, compute_dtype: torch.dtype, directions: int) -> OneSidedEstimator:
        return cls(_exact(eps, compute_dtype), directions)

    def probes(self) -> tuple[Probe, ...]:
        return (Probe(0, 0.0), *(Probe(d, self.eps) for d in range(self.directions)))

    def projected_gradients(self, losses: Sequence[torch.Tensor]) -> torch.Tensor:
        base = losses[0].float()
        return torch.stack([(loss.float() - base) / self.eps for loss in losses[1:]])


def estimator_for(name: str, eps: float, compute_dtype: torch.dtype, directions: int) -> Estimator:
    """The estimator ``name`` with ``directions`` directions, its ``eps`` exact in ``compute_dtype``."""
    if name == "two-sided":
        return TwoSidedEstimator.exact(eps, compute_dtype, directions)
    if name == "one-sided":
        return OneSidedEstimator.exact(eps, compute_dtype, directions)
    raise ValueError(f"estimator must be one of {', '.join(map(repr, ESTIMATORS))}, got {name!r}")


def coefficients(name: str, grads: torch.Tensor) -> torch.Tensor:
    """The step's ``c_d`` from the projected gradients ``g_d`` (1-d fp32) of estimator ``name``
    (see the module's docstring). Not finite when the g are not, or a one-sided step's g are all
    equal (σ = 0): such a step makes no update."""
    q = grads.numel()
    if name == "two-sided":
        return grads / q
    if name == "one-sided":
        return grads / (q * torch.std(grads, correction=1))
    raise ValueError(f"estimator must be one of {', '.join(map(repr, ESTIMATORS))}, got {name!r}")
