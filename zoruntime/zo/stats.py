"""What one ZO step reports: a frozen record read once at the end of the step."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class StepStats:
    """Step index (0-based), its seed and lr, every probe's loss and each direction's projected
    gradient.

    ``losses`` come in probe order: for the two-sided estimator ``L+_0, L−_0, L+_1, L−_1, ...``,
    for the one-sided one ``L_θ, L_0, L_1, ...`` (``zo/estimator.py``). ``projected_grads`` holds
    one g per direction. ``skipped``: a loss, g or the step's coefficients were not finite, so
    the step made no update (training goes on). ``changed_fraction``: of the trainable weights
    the updates applied during this step touched (the previous step's: updates are applied
    lazily; every one on a GPU's update kernel, a sample of 4,096 a group with tensor operations),
    the fraction they actually changed; far below 1 means updates round away (16-bit masters
    with round-to-nearest). None when no update was applied or the runner does not sample (left
    out of equality)."""

    step: int
    seed: int
    lr: float
    losses: tuple[float, ...]
    projected_grads: tuple[float, ...]
    skipped: bool = False
    changed_fraction: float | None = field(default=None, compare=False)
    estimator: str = "two-sided"

    @property
    def directions(self) -> int:
        return len(self.projected_grads)

    @property
    def loss(self) -> float:
        """An estimate of the loss at the unperturbed weights: the mean of a two-sided step's
        losses, a one-sided step's loss at θ."""
        if self.estimator == "one-sided":
            return self.losses[0]
        return sum(self.losses) / len(self.losses)
