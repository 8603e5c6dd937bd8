"""Task graphs of a ZO step, an evaluation, a flush and a load: what runs on which lane after
what. Stdlib only.

One step (Algorithm 1 of ZO2, generalised by a ``Plan``) over a table of units:

    embed → for each block unit u: [upload u →] compute u [→ offload u] → head

Compute-lane tasks run in model order (the hidden states flow through them). Streamed unit
j (in streamed order) goes through slot ``(r + j) % S`` (r: the pass's rotation); its upload waits for the offload that
emptied that slot, and, at depth k >= 1, for the compute of streamed unit ``j − k − 1`` so
that at most k uploads run ahead. Uploads, updates and offloads act on a unit's whole group.
Lanes run their tasks in graph order; edges are the data and slot dependencies.

Passes overlap. A step or evaluation returns once its last compute-lane task (the head) is
done; its offloads finish behind it, and it ends by uploading the first streamed units of the
next pass ahead of time (``ahead``): the same uploads into the same slots begin every pass, so
whatever the next call is, it finds them there. Between passes the scheduler orders the first
use of each slot after the previous pass's last (``first_in_slot``, ``releases``). Knows
nothing about tensors, devices or model families.
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
    phase: str = "step"  # the graph's phase: tasks of two passes overlap, and this tells them apart
    ahead: bool = False  # an upload for the next pass, issued at the end of this one

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
    """Tasks in issue order; each lane runs its own tasks in this order.

    ``waits``: the tasks a pass returns after (None: all of them, and nothing is left running);
    ``releases``: slot → the task after which this pass no longer uses the slot;
    ``first_in_slot``: slot → the upload that first fills it (it waits for the previous
    pass's release, or is replaced by the previous pass's upload ahead of the same unit).
    Slots turn across passes: a pass that starts at slot r puts streamed unit j in slot
    (r + j) mod S, so the next pass's first units go to the slots freed first."""

    tasks: tuple[Task, ...]
    phase: str = "step"  # "step" (training), "eval", "flush" or "load"
    lanes: tuple[Lane, ...] = field(default=tuple(Lane))
    waits: frozenset[int] | None = None
    releases: dict[int, int] = field(default_factory=dict)
    first_in_slot: dict[int, int] = field(default_factory=dict)
    rotation_after: int = 0  # the slot the next pass's first streamed unit goes to
    _on_lane: dict[Lane, tuple[Task, ...]] = field(init=False, repr=False, compare=False)  # each lane's, in order

    def __post_init__(self) -> None:  # the scheduler asks for each lane's tasks every pass
        object.__setattr__(self, "_on_lane", {lane: tuple(t for t in self.tasks if t.lane == lane) for lane in Lane})

    @property
    def ahead(self) -> list[Task]:
        return [t for t in self.tasks if t.ahead]

    @property
    def waited_lanes(self) -> frozenset[Lane]:
        """The lanes whose work must be done when the pass returns."""
        if self.waits is None:
            return frozenset(self.lanes)
        return frozenset(self.tasks[i].lane for i in self.waits)

    def on_lane(self, lane: Lane) -> tuple[Task, ...]:
        return self._on_lane[lane]

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)


class _Builder:
    def __init__(self, phase: str) -> None:
        self.phase = phase
        self.tasks: list[Task] = []
        self.releases: dict[int, int] = {}
        self.first_in_slot: dict[int, int] = {}

    def add(self, kind: Kind, unit: Unit, *deps: int | None, slot: int | None = None, ahead: bool = False) -> int:
        index = len(self.tasks)
        deps_ = tuple(d for d in deps if d is not None)
        self.tasks.append(Task(index, kind, unit, deps_, slot, self.phase, ahead))
        if slot is not None and not ahead:
            if kind is Kind.UPLOAD:
                self.first_in_slot.setdefault(slot, index)
            self.releases[slot] = index
        return index

    def graph(self, rotation_after: int = 0, waits: frozenset[int] | None = None) -> TaskGraph:
        return TaskGraph(tuple(self.tasks), self.phase, waits=waits, releases=self.releases,
                         first_in_slot=self.first_in_slot, rotation_after=rotation_after)  # fmt: skip


class _Streaming:
    """Where a plan puts the streamable units: their streamed order (and so their slots), or resident."""

    def __init__(self, units: UnitTable, plan: Plan, rotation: int = 0) -> None:
        streamable = units.streamable
        plan.validate(len(streamable))
        self.slots = plan.slots(len(streamable))
        self.depth = plan.depth
        self.streamed = [u for j, u in enumerate(streamable) if j not in plan.resident]
        self.position = {u.name: j for j, u in enumerate(self.streamed)}  # streamed order
        self.resident = [u for j, u in enumerate(streamable) if j in plan.resident]
        self.rotation = rotation % self.slots if self.slots else 0
        self.rotation_after = (self.rotation + len(self.streamed)) % self.slots if self.slots else 0

    def slot(self, j: int) -> int:
        """The slot of streamed position ``j`` in this pass (``j`` past the end: the next pass's)."""
        return (self.rotation + j) % self.slots


def _compute_kind(unit: Unit, block_kind: Kind) -> Kind:
    return {Stage.EMBED: Kind.EMBED, Stage.HEAD: Kind.HEAD, Stage.BLOCK: block_kind}[unit.stage]


def _forward(
    units: UnitTable,
    plan: Plan,
    block_kind: Kind,
    phase: str,
    offload: bool = True,
    ahead: bool = True,
    rotation: int = 0,
) -> TaskGraph:
    """Every unit in model order on the compute lane; streamed ones after an upload and, when
    ``offload``, before an offload. Without offloads a slot is free once its compute is done.
    The pass returns after its last compute-lane task; with ``ahead`` it then uploads the first
    streamed units of the next pass, each once its slot is free (the ones whose upload waits for
    nothing else in a pass: positions 0 … min(depth, slots − 1))."""
    b, placed = _Builder(phase), _Streaming(units, plan, rotation)
    middle_of: dict[int, int] = {}  # streamed position → its compute task
    offload_of: dict[int, int] = {}  # streamed position → the task after which its slot is free
    previous: int | None = None
    for unit in units:
        kind = _compute_kind(unit, block_kind)
        j = placed.position.get(unit.name)
        if j is None:
            previous = b.add(kind, unit, previous)
            continue
        slot = placed.slot(j)
        slot_free = offload_of.get(j - placed.slots)
        window = middle_of.get(j - placed.depth - 1) if placed.depth > 0 else None
        upload = b.add(Kind.UPLOAD, unit, slot_free, window, slot=slot)
        previous = middle_of[j] = b.add(kind, unit, upload, previous, slot=slot)
        writes_back = offload and unit.trainable  # a frozen unit's master never changes
        offload_of[j] = b.add(Kind.OFFLOAD, unit, previous, slot=slot) if writes_back else previous
    assert previous is not None
    last_compute = previous
    if ahead:
        n = len(placed.streamed)
        for j in range(min(placed.depth + 1, placed.slots, n)):
            slot = placed.slot(n + j)
            b.add(Kind.UPLOAD, placed.streamed[j], b.releases[slot], slot=slot, ahead=True)
    return b.graph(placed.rotation_after, waits=frozenset({last_compute}))


def step_graph(units: UnitTable, plan: Plan, offload: bool = True, ahead: bool = True, rotation: int = 0) -> TaskGraph:
    """One ZO step: embed, every block (both perturbed forwards), head; streamed blocks are
    written back unless ``offload`` is False (``Plan.offloads_at`` says which steps do); with
    ``ahead``, the next pass's first uploads follow. Streaming starts at slot ``rotation``."""
    return _forward(units, plan, Kind.COMPUTE, "step", offload, ahead, rotation)


def eval_graph(units: UnitTable, plan: Plan, rotation: int = 0) -> TaskGraph:
    """An unperturbed forward: embed, every block, head (pending updates are applied on the
    way), then the next pass's first uploads."""
    return _forward(units, plan, Kind.EVAL, "eval", rotation=rotation)


def flush_graph(units: UnitTable, plan: Plan, rotation: int = 0) -> TaskGraph:
    """Apply pending updates to every group and write every group back to host storage.

    Streamed groups: upload → update → offload (through the slots, as a step would). Groups on
    the compute device (resident units, then the kept groups): update → offload (a copy; they stay).
    Frozen groups are left alone. It returns when all is written back: nothing runs behind it.
    """
    b, placed = _Builder("flush"), _Streaming(units, plan, rotation)
    free_after: dict[int, int] = {}  # slot → the task after which it is free
    updates: dict[str, int] = {}
    for unit in units.streamable:
        j = placed.position.get(unit.name)
        if not unit.trainable:  # frozen: nothing pending, nothing to write back
            continue
        if j is None:
            updates[unit.name] = b.add(Kind.UPDATE, unit)
            continue
        slot = placed.slot(j)
        upload = b.add(Kind.UPLOAD, unit, free_after.get(slot), slot=slot)
        update = b.add(Kind.UPDATE, unit, upload, slot=slot)
        free_after[slot] = b.add(Kind.OFFLOAD, unit, update, slot=slot)
    for unit in placed.resident:
        if unit.trainable:
            b.add(Kind.OFFLOAD, unit, updates[unit.name])
    for unit in units.kept:
        if unit.trainable:
            b.add(Kind.OFFLOAD, unit, b.add(Kind.UPDATE, unit))
    return b.graph(placed.rotation_after)


def load_graph(units: UnitTable, plan: Plan) -> TaskGraph:
    """Bring every group that stays on the compute device there once, when the runtime opens."""
    b, placed = _Builder("load"), _Streaming(units, plan)
    for unit in (*units.kept, *placed.resident):
        b.add(Kind.UPLOAD, unit)
    return b.graph()


def graph_named(units: UnitTable, plan: Plan, name: str, rotation: int) -> TaskGraph:
    """The pass ``name`` ("step", "step without offloads", "eval", "flush") at ``rotation``."""
    if name == "eval":
        return eval_graph(units, plan, rotation=rotation)
    if name == "flush":
        return flush_graph(units, plan, rotation=rotation)
    if name not in ("step", "step without offloads"):
        raise ValueError(f"no pass is named {name!r}")
    return step_graph(units, plan, offload=name == "step", rotation=rotation)
