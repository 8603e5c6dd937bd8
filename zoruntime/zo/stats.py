"""What one ZO step reports: a frozen record read once at the end of the step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class StepStats:
    """Step index (0-based), its seed and lr, both perturbed losses and the projected gradient.

    ``skipped``: a loss was not finite, so the step made no update (training goes on).
    ``changed_fraction``: of a sample of trainable weights, the fraction that the updates applied
    during this step (the previous step's: updates are applied lazily) actually changed; far
    below 1 means updates round away (16-bit masters with round-to-nearest). None when no
    update was applied or the runner does not sample (left out of equality)."""

    step: int
    seed: int
    lr: float
    loss_plus: float
    loss_minus: float
    projected_grad: float
    skipped: bool = False
    changed_fraction: float | None = field(default=None, compare=False)

    @property
    def loss(self) -> float:
        """The mean of the two perturbed losses: an estimate of the loss at the unperturbed weights."""
        return (self.loss_plus + self.loss_minus) / 2
