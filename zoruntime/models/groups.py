"""Parameter groups laid out as flat buffers, with every parameter a view into its group's buffer.

A group is the unit of transfer and of randomness: one copy moves it, one random draw
perturbs it. Knows parameter names, shapes, offsets and which parameters take weight decay;
knows nothing about which model they came from (adapters list the parameters) or where the
buffer lives (callers allocate it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

Params = Mapping[str, torch.Tensor]
"""Parameters by name, passed explicitly to a stage (a group's views, perturbed or not)."""


@dataclass(frozen=True, slots=True)
class ParamSlice:
    """One parameter's place in its group: ``flat[offset : offset + numel].view(shape)``.

    ``decayed``: takes weight decay (not a bias or a norm); ``trainable``: the user's
    ``requires_grad`` when the layout was made (the runtime never changes that flag)."""

    name: str
    shape: tuple[int, ...]
    offset: int
    decayed: bool
    trainable: bool = True

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True, slots=True)
class GroupLayout:
    """The layout of one group: ordered parameter slices over a flat buffer of ``numel`` elements."""

    group: int
    slices: tuple[ParamSlice, ...]
    numel: int
    dtype: torch.dtype
    # ``(start, end, decayed)`` runs of the flat buffer an update changes: the trainable
    # parameters, adjacent ones with the same decay merged (made once, read on every update)
    update_ranges: tuple[tuple[int, int, bool], ...] = field(init=False, compare=False, repr=False)
    # ``(start, end)`` runs holding frozen parameters (z is zero there)
    frozen_ranges: tuple[tuple[int, int], ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        updated: list[tuple[int, int, bool]] = []
        frozen: list[tuple[int, int]] = []
        for s in self.slices:
            end = s.offset + s.numel
            if s.trainable and updated and updated[-1][1] == s.offset and updated[-1][2] == s.decayed:
                updated[-1] = (updated[-1][0], end, s.decayed)
            elif s.trainable:
                updated.append((s.offset, end, s.decayed))
            elif frozen and frozen[-1][1] == s.offset:
                frozen[-1] = (frozen[-1][0], end)
            else:
                frozen.append((s.offset, end))
        object.__setattr__(self, "update_ranges", tuple(updated))
        object.__setattr__(self, "frozen_ranges", tuple(frozen))

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @classmethod
    def of(cls, group: int, params: Iterable[tuple[str, nn.Parameter, bool]]) -> GroupLayout:
        """Lay out ``(name, parameter, decayed)`` triples in order; a tied parameter must appear once."""
        slices, offset, dtype, seen = [], 0, None, set()
        for name, param, decayed in params:
            if id(param) in seen:
                raise ValueError(f"parameter {name} appears twice in group {group}: tied weights belong once")
            seen.add(id(param))
            if dtype is None:
                dtype = param.dtype
            elif param.dtype != dtype:
                raise ValueError(f"group {group} mixes dtypes ({dtype} and {param.dtype} at {name})")
            slices.append(ParamSlice(name, tuple(param.shape), offset, decayed, param.requires_grad))
            offset += param.numel()
        if dtype is None:
            raise ValueError(f"group {group} has no parameters")
        return cls(group, tuple(slices), offset, dtype)

    @property
    def trainable(self) -> bool:
        """Whether any of the group's parameters is trained (a frozen group is never updated)."""
        return bool(self.update_ranges)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Name → view into ``flat`` for every parameter of the group."""
        self._check(flat)
        return {s.name: flat[s.offset : s.offset + s.numel].view(s.shape) for s in self.slices}

    def decayed_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Flat views of the parameters that take weight decay (not biases, not layer norms)."""
        self._check(flat)
        return [flat[s.offset : s.offset + s.numel] for s in self.slices if s.decayed]

    @torch.no_grad()
    def gather(self, params: Mapping[str, torch.Tensor], out: torch.Tensor) -> torch.Tensor:
        """Copy the named tensors into ``out`` in layout order."""
        for name, view in self.views(out).items():
            view.copy_(params[name])
        return out

    def _check(self, flat: torch.Tensor) -> None:
        if flat.dim() != 1 or flat.numel() < self.numel or not flat.is_contiguous():
            raise ValueError(
                f"group {self.group} needs a flat contiguous buffer of >= {self.numel} elements, "
                f"got shape {tuple(flat.shape)}"
            )


def existing_flat(layout: GroupLayout, params: Mapping[str, nn.Parameter]) -> torch.Tensor | None:
    """The flat buffer the parameters already are views of, laid out as ``layout`` says; else None.

    Lets a model whose groups are already flat (laid out by an earlier runtime, or materialised
    straight into host buffers by ``models.init.materialize_flat``) be used without a copy.
    """
    first = params[layout.slices[0].name]
    if first.device.type == "meta":
        return None
    storage = first.untyped_storage()
    base_offset = first.storage_offset() - layout.slices[0].offset
    if base_offset < 0:
        return None
    for piece in layout.slices:
        p = params[piece.name]
        if (
            p.untyped_storage().data_ptr() != storage.data_ptr()
            or p.storage_offset() != base_offset + piece.offset
            or not p.is_contiguous()
            or p.dtype != layout.dtype
        ):
            return None
    if (base_offset + layout.numel) * layout.dtype.itemsize > storage.nbytes():
        return None
    return torch.empty(0, dtype=layout.dtype, device=first.device).set_(storage, base_offset, (layout.numel,), (1,))


@torch.no_grad()
def adopt_into_flat(layout: GroupLayout, params: Mapping[str, nn.Parameter], flat: torch.Tensor) -> torch.Tensor:
    """Move the parameters' values into ``flat`` and make each parameter a view of it.

    Parameter objects keep their identity (a tied parameter stays tied); only their storage
    changes. Returns ``flat``.
    """
    layout.gather(params, flat)
    for name, view in layout.views(flat).items():
        params[name].data = view
    return flat
