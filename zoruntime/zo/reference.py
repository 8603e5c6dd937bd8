"""The in-memory reference ZO-SGD step: the oracle every offloaded configuration must equal.

Whole model in memory, no offload, no scheduler: each probe's forward (both perturbed ones of
MeZO's step; with several directions, every probe the estimator lists) runs through the
unmodified HF model (``functional_call`` on perturbed copies), then every group is updated.
It shares the flat group layout, the direction sampler and the arithmetic of ``update.py``
with the runtime, so equal inputs give equal bits. Kept short on purpose: read it to know
what a step means.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn
from torch.func import functional_call

from ..models.adapter import adapter_for
from ..models.batch import Batch, LossFn
from ..models.groups import GroupLayout, adopt_into_flat
from ..planning.memory import STEP_SPAN_ELEMENTS
from .config import ZOSGD
from .directions import DirectionSampler, step_seed
from .estimator import Probe, coefficients, estimator_for
from .stats import StepStats
from .update import PendingUpdate, draw_direction, perturb_into, update_group


class ReferenceZO:
    """ZO-SGD on a whole model in memory. The model's parameters become views of flat group buffers,
    cut as a runtime whose policy has this ``unit`` cuts them (so both draw the same z)."""

    def __init__(
        self,
        model: nn.Module,
        config: ZOSGD,
        loss_fn: LossFn | None = None,
        compute_dtype: torch.dtype | None = None,
        unit: str = "block",
    ) -> None:
        self.adapter = adapter_for(model, unit)  # its groups, one direction each: the runtime's with the same unit
        self.model = model
        self.config = config
        self.loss_fn = loss_fn  # None: the causal-LM loss in pieces, as the runtime computes it
        self.step_index = 0
        self.compute_dtype = compute_dtype or next(model.parameters()).dtype
        self.rounding = config.rounding_for(next(model.parameters()).dtype)
        if config.directions == "auto":
            raise ValueError("the reference runs a number of directions; give ZOSGD(directions=q) the runtime decided")
        self.estimator = estimator_for(config.estimator, config.eps, self.compute_dtype, int(config.directions))
        device = next(model.parameters()).device
        self.sampler = DirectionSampler(device)
        full_name = {id(p): n for n, p in model.named_parameters()}
        self._groups: list[tuple[GroupLayout, torch.Tensor, dict[str, str]]] = []
        for layout, params in self.adapter.groups():
            flat = torch.empty(layout.numel, dtype=layout.dtype, device=device)
            adopt_into_flat(layout, params, flat)
            names = {local: full_name[id(p)] for local, p in params.items()}
            self._groups.append((layout, flat, names))
        self._head_group = self.adapter.units.units[-1].group

    def _loss(
        self, batch: Batch, perturbed: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        """The model's own forward on ``perturbed`` to its last hidden state; from there the
        adapter's head on ``head`` (the head unit's group, by the adapter's names), as the runtime
        computes it: the logits for a user's loss, or by default ``head_loss``."""
        kwargs = {"attention_mask": batch.attention_mask, "output_hidden_states": True, "logits_to_keep": 1}
        final = functional_call(self.model, dict(perturbed), (batch.input_ids,), kwargs).hidden_states[-1]
        if self.loss_fn is not None:  # the logits a chunk of the vocabulary at a time, as the runtime makes them
            return self.loss_fn(self.adapter.head(head, final, final=True), batch)
        return self.adapter.head_loss(head, final, batch, final=True)

    def _probe_loss(self, batch: Batch, seed: int, probe: Probe) -> torch.Tensor:
        """The loss at ``θ + scale·z`` of the probe's direction (at θ, cast, for scale 0)."""
        weights: dict[str, torch.Tensor] = {}
        head: dict[str, torch.Tensor] = {}
        for layout, flat, names in self._groups:
            if probe.perturbed:
                z = draw_direction(self.sampler, seed, layout, torch.empty_like(flat), direction=probe.direction)
                copy = perturb_into(torch.empty_like(flat, dtype=self.compute_dtype), flat, z, probe.scale)
            else:
                copy = flat.to(self.compute_dtype)
            weights.update({names[k]: v for k, v in layout.views(copy).items()})
            if layout.group == self._head_group:
                head = layout.views(copy)
        return self._loss(batch, weights, head)

    @torch.no_grad()
    def step(self, batch: Batch | Mapping[str, object]) -> StepStats:
        """One ZO-SGD step on ``batch``; the weights are updated before this returns."""
        cfg, t, estimator = self.config, self.step_index, self.estimator
        seed, lr = step_seed(cfg.seed, t), cfg.lr_at(t)
        batch = self.adapter.validate(batch).to(self.sampler.device)
        losses = [self._probe_loss(batch, seed, probe) for probe in estimator.probes()]
        grads = estimator.projected_gradients(losses)
        update = PendingUpdate.from_gradient(t, seed, lr, cfg.weight_decay, coefficients(estimator.name, grads),
                                             self.rounding)  # fmt: skip
        values = torch.cat([torch.stack(losses).float(), grads, update.scaled_grads]).tolist()
        skipped = not all(math.isfinite(v) for v in values)  # a non-finite loss makes no update
        if not skipped:
            step = torch.empty(min(max(lay.numel for lay, _, _ in self._groups), STEP_SPAN_ELEMENTS),
                               dtype=torch.float32, device=self.sampler.device)  # fmt: skip
            for layout, flat, _ in self._groups:  # z is regenerated, never stored
                if layout.trainable:
                    update_group(flat, update, layout, self.sampler, torch.empty_like(flat), step)
        self.step_index += 1
        probes = len(losses)
        return StepStats(t, seed, lr, tuple(values[:probes]), tuple(values[probes : probes + grads.numel()]),
                         skipped=skipped, estimator=estimator.name)  # fmt: skip

    @torch.no_grad()
    def evaluate(self, batch: Batch | Mapping[str, object]) -> float:
        """The loss at the current (unperturbed) weights."""
        batch = self.adapter.validate(batch).to(self.sampler.device)
        weights, head = {}, {}
        for layout, flat, names in self._groups:
            cast = flat.to(self.compute_dtype)
            weights.update({names[k]: v for k, v in layout.views(cast).items()})
            if layout.group == self._head_group:
                head = layout.views(cast)
        return float(self._loss(batch, weights, head))
