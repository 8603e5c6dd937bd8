"""The ZO estimator: which perturbed copies a step evaluates, and how their losses become
projected gradients.

A probe is one perturbed evaluation of the model: weights ``θ + scale·z_d`` for direction
index ``d``. ``TwoSidedEstimator`` (MeZO's SPSA estimator) evaluates one direction at ``+ε``
and ``−ε`` and returns ``g = (L+ − L−) / 2ε``. Knows nothing about models, devices or
scheduling; the task work runs the probes and hands back the losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .update import projected_gradient


@dataclass(frozen=True, slots=True)
class Probe:
    """Evaluate the model at ``θ + scale·z``, z the step's direction ``direction``."""

    direction: int
    scale: float


UNPERTURBED = (Probe(0, 0.0),)
"""The probes of an evaluation: the weights themselves."""


@dataclass(frozen=True, slots=True)
class TwoSidedEstimator:
    """One direction, probed at ``+eps`` and ``−eps``: ``g = (L+ − L−) / 2·eps``."""

    eps: float

    @classmethod
    def exact(cls, eps: float, compute_dtype: torch.dtype) -> TwoSidedEstimator:
        """The estimator whose ``eps`` a perturbation in ``compute_dtype`` applies exactly: ``eps``
        rounded to that dtype (a 16-bit add rounds its scale), so g divides by what was applied."""
        return cls(float(torch.tensor(eps, dtype=compute_dtype)))

    @property
    def directions(self) -> int:
        return 1

    def probes(self) -> tuple[Probe, ...]:
        return (Probe(0, self.eps), Probe(0, -self.eps))

    def projected_gradients(self, losses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """One projected gradient per direction from the probes' losses, in probe order (no host sync)."""
        loss_plus, loss_minus = losses
        return (projected_gradient(loss_plus, loss_minus, self.eps),)
