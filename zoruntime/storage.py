"""Where every group's weights live during a run, allocated once when the runtime opens.

- host masters: one flat buffer per block and one for the resident group; the model's own
  parameters become views of them, so the model always sees the master weights;
- compute side: the resident group, the resident blocks, ``S`` streaming slots, and working
  buffers (a perturbed copy and a direction for blocks, the same for the resident group).

Knows layouts, the plan and the backend's allocators; knows nothing about tasks or ZO math.
"""

from __future__ import annotations

import torch

from .device.base import Backend
from .models.groups import GroupLayout, adopt_into_flat
from .models.opt import OPTAdapter
from .policies.base import Plan


class Storage:
    def __init__(self, adapter: OPTAdapter, plan: Plan, backend: Backend) -> None:
        layouts = adapter.block_layouts
        if len({(lay.numel, lay.dtype, lay.slices) for lay in layouts}) != 1:
            raise ValueError("every decoder block must have the same parameters, shapes and dtype to share slots")
        block: GroupLayout = layouts[0]
        group = adapter.resident_layout
        self.block_layout = block
        self.group_layout = group
        self.plan = plan
        self.host_blocks = [
            adopt_into_flat(lay, adapter.block_parameters(i), backend.host_empty(lay.numel, lay.dtype))
            for i, lay in enumerate(layouts)
        ]
        self.host_group = adopt_into_flat(
            group, adapter.resident_parameters(), backend.host_empty(group.numel, group.dtype)
        )
        empty_block = lambda: backend.compute_empty(block.numel, block.dtype)  # noqa: E731
        self.group = backend.compute_empty(group.numel, group.dtype)
        self.group.copy_(self.host_group)
        self.group_scratch = backend.compute_empty(group.numel, group.dtype)
        self.group_z = backend.compute_empty(group.numel, group.dtype)
        self.resident_blocks = {b: empty_block() for b in sorted(plan.resident)}
        self.slots = [empty_block() for _ in range(plan.slots(len(layouts)))]
        self.scratch = empty_block()
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

    @property
    def compute_bytes(self) -> int:
        """Bytes of compute-side buffers (group, its working copies, blocks, slots, working)."""
        tensors = [self.group, self.group_scratch, self.group_z, self.scratch, self.z]
        tensors += [*self.resident_blocks.values(), *self.slots]
        return sum(t.numel() * t.element_size() for t in tensors)
