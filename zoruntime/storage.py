"""Where every group's weights live during a run, allocated once when the runtime opens.

- host masters: one flat buffer per block and one for the resident group; the model's own
  parameters become views of them, so the model always sees the master weights;
- compute side: the resident group, the resident blocks, ``S`` streaming slots, and working
  buffers (a perturbed copy and a direction for blocks, the same for the resident group).

A model whose groups are already flat host buffers is used as it is (pinned in place on CUDA).

Knows layouts, the plan and the backend's allocators; knows nothing about tasks or ZO math.
"""

from __future__ import annotations

import torch
from torch import nn

from .device.base import Backend
from .models.groups import GroupLayout, adopt_into_flat, existing_flat
from .models.opt import OPTAdapter
from .policies.base import Plan


def _host_master(layout: GroupLayout, params: dict[str, nn.Parameter], backend: Backend) -> torch.Tensor:
    flat = existing_flat(layout, params)
    if flat is not None and flat.device.type == "cpu":
        return backend.host_adopt(flat)
    return adopt_into_flat(layout, params, backend.host_empty(layout.numel, layout.dtype))


class Storage:
    """Buffers of one run. Masters keep the model's dtype; the perturbed copies are in ``compute_dtype``."""

    def __init__(self, adapter: OPTAdapter, plan: Plan, backend: Backend, compute_dtype: torch.dtype) -> None:
        layouts = adapter.block_layouts
        if len({(lay.numel, lay.dtype, lay.slices) for lay in layouts}) != 1:
            raise ValueError("every decoder block must have the same parameters, shapes and dtype to share slots")
        block: GroupLayout = layouts[0]
        group = adapter.resident_layout
        self.block_layout = block
        self.group_layout = group
        self.plan = plan
        self.compute_dtype = compute_dtype
        self.host_blocks = [_host_master(lay, adapter.block_parameters(i), backend) for i, lay in enumerate(layouts)]
        self.host_group = _host_master(group, adapter.resident_parameters(), backend)
        empty_block = lambda: backend.compute_empty(block.numel, block.dtype)  # noqa: E731
        self.group = backend.compute_empty(group.numel, group.dtype)
        self.group.copy_(self.host_group)
        self.group_scratch = backend.compute_empty(group.numel, compute_dtype)
        self.group_z = backend.compute_empty(group.numel, group.dtype)
        self.resident_blocks = {b: empty_block() for b in sorted(plan.resident)}
        self.slots = [empty_block() for _ in range(plan.slots(len(layouts)))]
        self.scratch = backend.compute_empty(block.numel, compute_dtype)
        self.z = empty_block()
        self.scratch_views = block.views(self.scratch)
        self.group_scratch_views = group.views(self.group_scratch)

    def compute_buffer(self, block: int, slot: int | None) -> torch.Tensor:
        """The compute-side buffer holding ``block``: its resident buffer or its streaming slot."""
        if block in self.resident_blocks:
            return self.resident_blocks[block]
        if slot is None:
            raise ValueError(f"block {block} is streamed but the task names no slot")
        return self.slots[slot]


def bytes_needed(adapter: OPTAdapter, plan: Plan, compute_dtype: torch.dtype) -> int:
    """Compute-side bytes ``Storage`` allocates for ``plan`` (before activations)."""
    block, group = adapter.block_layouts[0], adapter.resident_layout
    scratch = block.numel * compute_dtype.itemsize
    group_bytes = 2 * group.nbytes + group.numel * compute_dtype.itemsize
    blocks = len(plan.resident) + plan.slots(adapter.num_blocks) + 1  # + the direction buffer
    return group_bytes + blocks * block.nbytes + scratch


def out_of_memory_advice(
    adapter: OPTAdapter, plan: Plan, compute_dtype: torch.dtype, free_bytes: int, what: str
) -> str:
    """Says how much ``plan`` needed, how much was free, and which plan would fit."""
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    need = bytes_needed(adapter, plan, compute_dtype)
    text = f"out of device memory: {what} needs {gib(need)} for its buffers, {gib(free_bytes)} is free"
    for depth in (2, 1, 0):
        if depth < plan.depth or (depth == plan.depth and plan.resident):
            candidate = Plan(depth)
            fits = bytes_needed(adapter, candidate, compute_dtype)
            if fits < 0.9 * free_bytes:
                return f"{text}; FixedDepth({depth}) needs {gib(fits)} and would fit (activations come on top)"
    return f"{text}; even FixedDepth(0) needs {gib(bytes_needed(adapter, Plan(0), compute_dtype))}: use a bigger GPU"
