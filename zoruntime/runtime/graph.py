"""Task graphs of a ZO step, an evaluation, a flush and a load: what runs on which lane after
what. Stdlib only.

One step (Algorithm 1 of ZO2, generalised by a ``Plan``) over a table of units:

    embed → for each block unit u: [upload u →] compute u [→ offload u] → head

Compute-lane tasks run in model order (the hidden states flow through them). Streamed unit
j (in streamed order) goes through slot ``j % S``; its upload waits for the offload that
emptied that slot, and, at depth k >= 1, for the compute of streamed unit ``j − k − 1`` so
that at most k uploads run ahead. Uploads, updates and offloads act on a unit's whole group.
Lanes run their tasks in graph order; edges are the data and slot dependencies. Knows nothing
about tensors, devices or model families.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from ..policies.base import Plan
from .units import Stage, Unit, UnitTable


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


_GROUP_WIDE = frozenset({Kind.UPLOAD, Kind.UPDATE, Kind.OFFLOAD})


@dataclass(frozen=True, slots=True)
class Task:
    """One node: a task of ``kind`` on ``unit`` (uploads, updates and offloads move or change the
    unit's whole group); ``slot`` for a streamed unit."""

    index: int
    kind: Kind
    unit: Unit
    deps: tuple[int, ...]
    slot: int | None = None

    @property
    def lane(self) -> Lane:
        return _LANE_OF[self.kind]

    @property
    def subject(self) -> str:
        """What the task acts on: the unit's group for group-wide kinds, the unit otherwise."""
        return self.unit.group_name if self.kind in _GROUP_WIDE else self.unit.name

    def __str__(self) -> str:
        kind, subject = self.kind.value, self.subject
        return kind if kind == subject else f"{kind} of {subject}"


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

    def add(self, kind: Kind, unit: Unit, *deps: int | None, slot: int | None = None) -> int:
        index = len(self.tasks)
        self.tasks.append(Task(index, kind, unit, tuple(d for d in deps if d is not None), slot))
        return index

    def graph(self, phase: str) -> TaskGraph:
        return TaskGraph(tuple(self.tasks), phase)


class _Streaming:
    """Where a plan puts the streamable units: their streamed order (and so their slots), or resident."""

    def __init__(self, units: UnitTable, plan: Plan) -> None:
        streamable = units.streamable
        plan.validate(len(streamable))
        self.slots = plan.slots(len(streamable))
        self.depth = plan.depth
        streamed = [u for j, u in enumerate(streamable) if j not in plan.resident]
        self.position = {u.name: j for j, u in enumerate(streamed)}  # streamed order
        self.resident = [u for j, u in enumerate(streamable) if j in plan.resident]


def _compute_kind(unit: Unit, block_kind: Kind) -> Kind:
    return {Stage.EMBED: Kind.EMBED, Stage.HEAD: Kind.HEAD, Stage.BLOCK: block_kind}[unit.stage]


def _forward(units: UnitTable, plan: Plan, block_kind: Kind, phase: str, offload: bool = True) -> TaskGraph:
    """Every unit in model order on the compute lane; streamed ones after an upload and, when
    ``offload``, before an offload. Without offloads a slot is free once its compute is done."""
    b, placed = _Builder(), _Streaming(units, plan)
    middle_of: dict[int, int] = {}  # streamed position → its compute task
    offload_of: dict[int, int] = {}  # streamed position → the task after which its slot is free
    previous: int | None = None
    for unit in units:
        kind = _compute_kind(unit, block_kind)
        j = placed.position.get(unit.name)
        if j is None:
            previous = b.add(kind, unit, previous)
            continue
        slot = j % placed.slots
        slot_free = offload_of.get(j - placed.slots)
        window = middle_of.get(j - placed.depth - 1) if placed.depth > 0 else None
        upload = b.add(Kind.UPLOAD, unit, slot_free, window, slot=slot)
        previous = middle_of[j] = b.add(kind, unit, upload, previous, slot=slot)
        offload_of[j] = b.add(Kind.OFFLOAD, unit, previous, slot=slot) if offload else previous
    return b.graph(phase)


def step_graph(units: UnitTable, plan: Plan, offload: bool = True) -> TaskGraph:
    """One ZO step: embed, every block (both perturbed forwards), head; streamed blocks are
    written back unless ``offload`` is False (``Plan.offloads_at`` says which steps do)."""
    return _forward(units, plan, Kind.COMPUTE, "step", offload)


def eval_graph(units: UnitTable, plan: Plan) -> TaskGraph:
    """An unperturbed forward: embed, every block, head (pending updates are applied on the way)."""
    return _forward(units, plan, Kind.EVAL, "eval")


def flush_graph(units: UnitTable, plan: Plan) -> TaskGraph:
    """Apply pending updates to every group and write every group back to host storage.

    Streamed groups: upload → update → offload (through the slots, as a step would). Groups on
    the compute device (resident units, then the kept groups): update → offload (a copy; they stay).
    """
    b, placed = _Builder(), _Streaming(units, plan)
    offload_of: dict[int, int] = {}
    updates: dict[str, int] = {}
    for unit in units.streamable:
        j = placed.position.get(unit.name)
        if j is None:
            updates[unit.name] = b.add(Kind.UPDATE, unit)
            continue
        slot = j % placed.slots
        upload = b.add(Kind.UPLOAD, unit, offload_of.get(j - placed.slots), slot=slot)
        update = b.add(Kind.UPDATE, unit, upload, slot=slot)
        offload_of[j] = b.add(Kind.OFFLOAD, unit, update, slot=slot)
    for unit in placed.resident:
        b.add(Kind.OFFLOAD, unit, updates[unit.name])
    for unit in units.kept:
        b.add(Kind.OFFLOAD, unit, b.add(Kind.UPDATE, unit))
    return b.graph("flush")


def load_graph(units: UnitTable, plan: Plan) -> TaskGraph:
    """Bring every group that stays on the compute device there once, when the runtime opens."""
    b, placed = _Builder(), _Streaming(units, plan)
    for unit in (*units.kept, *placed.resident):
        b.add(Kind.UPLOAD, unit)
    return b.graph("load")
