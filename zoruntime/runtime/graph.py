"""Task graphs of a ZO step, a flush and a load: what runs on which lane after what. Stdlib only.

One step (Algorithm 1 of ZO2, generalised by a ``Plan``):

    embed → for each block b: [upload b →] compute b [→ offload b] → head

Compute-lane tasks run in model order (the hidden states flow through them). Streamed block
j (in streamed order) goes through slot ``j % S``; its upload waits for the offload that
emptied that slot, and, at depth k >= 1, for the compute of streamed block ``j − k − 1`` so
that at most k uploads run ahead. Lanes run their tasks in graph order; edges are the data
and slot dependencies. Knows nothing about tensors or devices.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from ..policies.base import Plan


class Kind(StrEnum):
    EMBED = "embed"
    UPLOAD = "upload"
    COMPUTE = "compute"
    OFFLOAD = "offload"
    HEAD = "head"
    UPDATE = "update"
    EVAL = "eval"


class Lane(StrEnum):
    UPLOAD = "upload"
    COMPUTE = "compute"
    OFFLOAD = "offload"


_LANE_OF = {
    Kind.EMBED: Lane.COMPUTE,
    Kind.UPLOAD: Lane.UPLOAD,
    Kind.COMPUTE: Lane.COMPUTE,
    Kind.OFFLOAD: Lane.OFFLOAD,
    Kind.HEAD: Lane.COMPUTE,
    Kind.UPDATE: Lane.COMPUTE,
    Kind.EVAL: Lane.COMPUTE,
}


@dataclass(frozen=True, slots=True)
class Task:
    """One node: ``block`` is None for the resident group (embedding and head); ``slot`` for streamed blocks."""

    index: int
    kind: Kind
    block: int | None
    deps: tuple[int, ...]
    slot: int | None = None

    @property
    def lane(self) -> Lane:
        return _LANE_OF[self.kind]

    def __str__(self) -> str:
        what = "the resident group" if self.block is None else f"block {self.block}"
        return f"{self.kind.value} of {what}"


@dataclass(frozen=True, slots=True)
class TaskGraph:
    """Tasks in issue order; each lane runs its own tasks in this order."""

    tasks: tuple[Task, ...]
    phase: str = "step"  # "step" (training), "eval", "flush" or "load"
    lanes: tuple[Lane, ...] = field(default=tuple(Lane))

    def on_lane(self, lane: Lane) -> list[Task]:
        return [t for t in self.tasks if t.lane == lane]

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)


class _Builder:
    def __init__(self) -> None:
        self.tasks: list[Task] = []

    def add(self, kind: Kind, block: int | None, *deps: int | None, slot: int | None = None) -> int:
        index = len(self.tasks)
        self.tasks.append(Task(index, kind, block, tuple(d for d in deps if d is not None), slot))
        return index

    def graph(self, phase: str) -> TaskGraph:
        return TaskGraph(tuple(self.tasks), phase)


def _streaming(
    b: _Builder, num_blocks: int, plan: Plan, middle: Kind, first: int | None, pass_along: bool
) -> int | None:
    """Add upload → ``middle`` → offload for streamed blocks and ``middle`` alone for resident ones.

    ``pass_along`` chains the middle tasks (hidden states flow block to block). Returns the
    last middle task.
    """
    plan.validate(num_blocks)
    slots = plan.slots(num_blocks)
    middle_of: dict[int, int] = {}  # streamed position → its middle task
    offload_of: dict[int, int] = {}
    position = {blk: j for j, blk in enumerate(plan.streamed(num_blocks))}
    previous = first
    for blk in range(num_blocks):
        j = position.get(blk)
        if j is None:
            previous = b.add(middle, blk, previous if pass_along else None)
            continue
        slot_free = offload_of.get(j - slots)
        window = middle_of.get(j - plan.depth - 1) if plan.depth > 0 else None
        upload = b.add(Kind.UPLOAD, blk, slot_free, window, slot=j % slots)
        previous = middle_of[j] = b.add(middle, blk, upload, previous if pass_along else None, slot=j % slots)
        offload_of[j] = b.add(Kind.OFFLOAD, blk, previous, slot=j % slots)
    return previous


def _forward(num_blocks: int, plan: Plan, block_kind: Kind, phase: str) -> TaskGraph:
    b = _Builder()
    embed = b.add(Kind.EMBED, None)
    last = _streaming(b, num_blocks, plan, block_kind, embed, pass_along=True)
    b.add(Kind.HEAD, None, last)
    return b.graph(phase)


def step_graph(num_blocks: int, plan: Plan) -> TaskGraph:
    """One ZO step: embed, every block (both perturbed forwards), head."""
    return _forward(num_blocks, plan, Kind.COMPUTE, "step")


def eval_graph(num_blocks: int, plan: Plan) -> TaskGraph:
    """An unperturbed forward: embed, every block, head (the pending update is applied on the way)."""
    return _forward(num_blocks, plan, Kind.EVAL, "eval")


def flush_graph(num_blocks: int, plan: Plan) -> TaskGraph:
    """Apply the pending update everywhere and write every block back to host storage.

    Streamed blocks: upload → update → offload. Resident blocks: update → offload (a copy;
    they stay resident). The resident group: update → offload.
    """
    b = _Builder()
    _streaming(b, num_blocks, plan, Kind.UPDATE, None, pass_along=False)
    for blk in sorted(plan.resident):
        compute = next(t.index for t in b.tasks if t.kind == Kind.UPDATE and t.block == blk)
        b.add(Kind.OFFLOAD, blk, compute)
    update = b.add(Kind.UPDATE, None)
    b.add(Kind.OFFLOAD, None, update)
    return b.graph("flush")


def load_graph(num_blocks: int, plan: Plan) -> TaskGraph:
    """Bring the resident blocks to the compute device once, when the runtime opens."""
    plan.validate(num_blocks)
    b = _Builder()
    for blk in sorted(plan.resident):
        b.add(Kind.UPLOAD, blk)
    return b.graph("load")
