"""The ZO arithmetic on flat group buffers: perturbed copies, projected gradient, update.

Every place that perturbs or updates weights (the in-memory reference and every backend of
the runtime) calls these functions, so the same inputs give the same bits everywhere. The
master weights are never perturbed in place: a perturbed copy is written into a scratch
buffer. Knows nothing about models, devices or scheduling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def perturb_into(out: torch.Tensor, weights: torch.Tensor, z: torch.Tensor, scale: float) -> torch.Tensor:
    """``out = weights + scale·z`` for flat tensors; ``weights`` is left untouched."""
    # out, weights, z: [numel]
    return torch.add(weights, z, alpha=scale, out=out)


def projected_gradient(loss_plus: torch.Tensor, loss_minus: torch.Tensor, eps: float) -> torch.Tensor:
    """``g = (f(θ+εz) − f(θ−εz)) / 2ε`` as a 0-d fp32 tensor on the losses' device (no host sync)."""
    return (loss_plus.float() - loss_minus.float()) / (2.0 * eps)


@dataclass(frozen=True, slots=True)
class PendingUpdate:
    """An update computed at ``step`` and not yet applied to every group.

    ``scaled_grad`` is ``−lr·g``: a 0-d fp32 tensor that may stay on the compute device.
    """

    step: int
    seed: int
    lr: float
    weight_decay: float
    scaled_grad: torch.Tensor

    @classmethod
    def from_gradient(cls, step: int, seed: int, lr: float, weight_decay: float, grad: torch.Tensor) -> PendingUpdate:
        return cls(step=step, seed=seed, lr=lr, weight_decay=weight_decay, scaled_grad=grad * -lr)


def apply_update(
    weights: torch.Tensor, z: torch.Tensor, update: PendingUpdate, decayed: Sequence[torch.Tensor]
) -> None:
    """``θ ← θ·(1 − lr·wd) − lr·g·z`` in place; decay only on ``decayed`` (views into ``weights``)."""
    # weights, z: [numel]; decayed: views of weights (not biases, not layer norms)
    decay = update.lr * update.weight_decay
    if decay:
        for view in decayed:
            view.mul_(1.0 - decay)
    weights.addcmul_(z, update.scaled_grad.to(device=weights.device))
