"""MeZO as its users run it: the benchmark's baseline, written by us from the paper's Algorithm 1
(Malladi et al., "Fine-Tuning Language Models with Just Forward Passes", 2023).

All weights on the compute device. Each step perturbs the parameters in place, tensor by tensor,
with z drawn from a generator reseeded with the step's seed (+ε, then −2ε, then +ε back), runs
the model's own forward and loss at θ+εz and θ−εz, reads g = (L+ − L−) / 2ε on the host, then
redraws each z from the same seed and updates θ ← θ − lr·(g·z + wd·θ), weight decay skipping
biases and layer norms as MeZO does. A private generator stands in for MeZO's reseeding of the
global one (this package never touches the global RNG). Not bitwise comparable with the runtime
(one z per tensor, in-place arithmetic): it is the thing to be faster than, not an oracle.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .directions import step_seed


def _decayed(name: str) -> bool:
    return "bias" not in name and "layer_norm" not in name and "layernorm" not in name


class MeZOBaseline:
    """ZO-SGD over ``model``'s trainable parameters, in place, as MeZO's trainer does it."""

    def __init__(self, model: nn.Module, lr: float, eps: float, weight_decay: float = 0.0, seed: int = 0) -> None:
        self.model = model.eval()
        self.params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        self.lr, self.eps, self.weight_decay, self.seed = lr, eps, weight_decay, seed
        self.generator = torch.Generator(device=self.params[0][1].device)
        self.step_index = 0

    def _perturb(self, seed: int, scale: float) -> None:
        self.generator.manual_seed(seed)
        for _, p in self.params:
            z = torch.normal(0.0, 1.0, size=p.shape, device=p.device, dtype=p.dtype, generator=self.generator)
            p.data.add_(z, alpha=scale)

    def _loss(self, batch: Mapping[str, torch.Tensor]) -> float:
        return float(self.model(**batch).loss)  # MeZO reads the loss on the host, every forward

    @torch.no_grad()
    def step(self, batch: Mapping[str, torch.Tensor]) -> tuple[float, float, float]:
        """One step on ``batch`` (``input_ids``, ``labels``, optionally ``attention_mask``, on the
        model's device); returns (L+, L−, g)."""
        seed = step_seed(self.seed, self.step_index)
        self._perturb(seed, self.eps)
        loss_plus = self._loss(batch)
        self._perturb(seed, -2 * self.eps)
        loss_minus = self._loss(batch)
        self._perturb(seed, self.eps)
        grad = (loss_plus - loss_minus) / (2 * self.eps)
        self.generator.manual_seed(seed)
        for name, p in self.params:
            z = torch.normal(0.0, 1.0, size=p.shape, device=p.device, dtype=p.dtype, generator=self.generator)
            if self.weight_decay and _decayed(name):
                p.data.sub_(self.lr * (grad * z + self.weight_decay * p.data))
            else:
                p.data.sub_(self.lr * grad * z)
        self.step_index += 1
        return loss_plus, loss_minus, grad
