"""Where every group's weights live during a run, allocated once when the runtime opens.

- host masters: one flat buffer per group; the model's own parameters become views of them,
  so the model always sees the master weights (a model whose groups are already flat host
  buffers is used as it is, pinned in place on CUDA);
- compute side, exactly as ``zoruntime.planning.memory`` counts it: the groups kept there (the
  embedding and head) with the buffers that perturb them a piece at a time (``KeptBuffers``),
  the groups the plan keeps resident, the streaming slots, and one perturbed copy shared by the
  streamable groups; their z is drawn into the perturbed copy's buffer, or into a direction
  buffer of its own when the compute dtype is not the masters'; with several directions per
  step, the float32 buffer their updates are summed in.

Knows layouts, units, the plan and the backend's allocators; knows nothing about tasks or ZO math.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .device.base import Backend
from .models.adapter import ModelAdapter, adapter_for
from .models.groups import GroupLayout, ParamSlice, adopt_into_flat, existing_flat
from .planning import memory
from .planning.memory import GroupSize, ModelLayout, rows_per_chunk
from .policies.base import UNIT_KINDS, Plan
from .zo.directions import DrawnChunk


def _chunk_numel(piece: ParamSlice) -> int:
    """Elements of one chunk of rows of a vocabulary-sized parameter (all of it when smaller)."""
    width = piece.numel // piece.shape[0]
    return min(piece.shape[0], rows_per_chunk(width)) * width


@dataclass(frozen=True, slots=True)
class KeptBuffers:
    """What a kept group is perturbed with, never the whole group at once: ``rest`` holds the
    perturbed copy of its parameters that are not vocabulary-sized (``rest_slices``: each one's
    slice of the group and its offset in ``rest``; ``rest_views``: them by name), ``rows`` one
    chunk of rows of each vocabulary-sized parameter (in the compute dtype), ``z`` a span of
    the direction (in the masters' dtype), and ``drawn`` the last chunk of the direction drawn
    whole for the part of it a piece or a chunk of rows needed (the next part comes from there)."""

    rest: torch.Tensor
    rest_slices: tuple[tuple[ParamSlice, int], ...]
    rest_views: dict[str, torch.Tensor]
    rows: dict[str, torch.Tensor]
    z: torch.Tensor
    drawn: DrawnChunk

    @classmethod
    def allocate(
        cls, layout: GroupLayout, vocab: frozenset[str], dtype: torch.dtype, empty: Callable[..., torch.Tensor]
    ) -> KeptBuffers:
        rest_slices, packed = [], 0
        for piece in layout.slices:
            if piece.name not in vocab:
                rest_slices.append((piece, packed))
                packed += piece.numel
        rest = empty(packed, dtype)
        views = {p.name: rest[at : at + p.numel].view(p.shape) for p, at in rest_slices}
        rows = {p.name: empty(_chunk_numel(p), dtype) for p in layout.slices if p.name in vocab}
        span = min(layout.numel, memory.KEPT_SPAN_ELEMENTS)
        return cls(rest, tuple(rest_slices), views, rows, empty(span, layout.dtype),
                   DrawnChunk(empty(span, layout.dtype)))  # fmt: skip


def _host_master(layout: GroupLayout, params: dict[str, nn.Parameter], backend: Backend) -> torch.Tensor:
    flat = existing_flat(layout, params)
    if flat is not None and flat.device.type == "cpu":
        return backend.host_adopt(flat)
    return adopt_into_flat(layout, params, backend.host_empty(layout.numel, layout.dtype))


def model_layout(adapter: ModelAdapter, compute_dtype: torch.dtype, several_directions: bool = False) -> ModelLayout:
    """The sizes the planner and the memory model see: each group, and whether a plan may stream
    it; ``several_directions``: steps may use more than one direction."""
    streamable = {u.group for u in adapter.units.streamable}
    groups, mixed = [], False
    for layout, _ in adapter.groups():
        mixed |= layout.group in streamable and layout.dtype != compute_dtype
        vocab = [p for p in layout.slices if p.name in adapter.vocab_names and layout.group not in streamable]
        chunked, rows = sum(p.numel for p in vocab), sum(_chunk_numel(p) for p in vocab)
        groups.append(GroupSize(layout.numel, layout.dtype.itemsize, layout.group in streamable, chunked, rows))
    return ModelLayout(tuple(groups), compute_dtype.itemsize, several_directions, mixed)


def finer_layouts(model: nn.Module, unit: str, compute_dtype: torch.dtype) -> dict[str, ModelLayout]:
    """``model`` cut into each unit finer than ``unit``, where its blocks can be (for the advice an
    out-of-memory error gives)."""
    found = {}
    for finer in UNIT_KINDS[UNIT_KINDS.index(unit) + 1 :]:
        try:
            found[finer] = model_layout(adapter_for(model, finer), compute_dtype)
        except ValueError:  # blocks that route tokens stream whole
            continue
    return found


def compute_dtype_for(master: torch.dtype, requested: object) -> torch.dtype:
    """The dtype the perturbed copies and forwards use: ``requested`` (None: the masters'), a
    floating ``torch.dtype`` no wider than the masters'."""
    if requested is None:
        return master
    if not isinstance(requested, torch.dtype):
        raise TypeError(f"compute_dtype must be a torch.dtype (torch.bfloat16, say), got {requested!r}")
    if not requested.is_floating_point or requested.itemsize > master.itemsize:
        raise ValueError(
            f"compute_dtype {requested} must be a floating type no wider than the master weights' "
            f"{master}; load the model in float32 to compute in float16 or bfloat16 with fp32 masters"
        )
    return requested


class Storage:
    """Buffers of one run, by group id. Masters keep the model's dtype; perturbed copies are in
    ``compute_dtype``."""

    def __init__(
        self, adapter: ModelAdapter, plan: Plan, backend: Backend, compute_dtype: torch.dtype, step_span: int = 0
    ) -> None:
        groups = adapter.groups()
        self.layouts = [lay for lay, _ in groups]
        self.plan = plan
        self.compute_dtype = compute_dtype
        self.device = backend.device
        streamable = [self.layouts[u.group] for u in adapter.units.streamable]
        if len({lay.dtype for lay in streamable}) != 1:
            raise ValueError("every streamed group must have the same dtype to share slots")
        numel, dtype = max(lay.numel for lay in streamable), streamable[0].dtype
        kept = [u.group for u in adapter.units.kept]
        resident = [streamable[j].group for j in sorted(plan.resident)]
        self.host = [_host_master(lay, params, backend) for lay, params in groups]
        empty = backend.compute_empty

        self._on_device = {g: empty(self.layouts[g].numel, self.layouts[g].dtype) for g in kept + resident}
        self.slots = [empty(numel, dtype) for _ in range(plan.slots(len(streamable)))]
        # kept groups run at both ends of a step, perturbed a piece at a time
        self.kept = {g: KeptBuffers.allocate(self.layouts[g], adapter.vocab_names, compute_dtype, empty) for g in kept}
        self._shared_scratch = empty(numel, compute_dtype)
        # z is drawn in the masters' dtype: into the perturbed copy's buffer when that is the
        # compute dtype too, else into a buffer of its own (the memory model counts the same)
        self.directions_in_scratch = dtype == compute_dtype
        self._shared_direction = self._shared_scratch if self.directions_in_scratch else empty(numel, dtype)
        # an update of several directions sums their z here, a span at a time (None: one direction)
        self.step = empty(step_span, torch.float32) if step_span else None
        # the parameter views of each streamable group's perturbed copy, made once: the host builds
        # them per parameter, which costs more than launching a small kernel
        self.scratch_views = {lay.group: lay.views(self.scratch(lay.group)) for lay in streamable}

    def on_device(self, group: int) -> bool:
        """Whether ``group`` stays on the compute device for the whole run (kept or resident)."""
        return group in self._on_device

    def weights(self, group: int, slot: int | None) -> torch.Tensor:
        """The compute-side buffer holding ``group``: its own, or the streaming slot it is in."""
        if group in self._on_device:
            return self._on_device[group]
        if slot is None:
            raise ValueError(f"group {group} is streamed but the task names no slot")
        return self.slots[slot][: self.layouts[group].numel]

    def scratch(self, group: int) -> torch.Tensor:
        """Where streamable ``group``'s perturbed copy is written, in the compute dtype."""
        return self._shared_scratch[: self.layouts[group].numel]

    def direction(self, group: int) -> torch.Tensor:
        """Where streamable ``group``'s direction is drawn (its perturbed copy's buffer when
        ``directions_in_scratch``)."""
        return self._shared_direction[: self.layouts[group].numel]
