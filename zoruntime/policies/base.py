"""Prefetch and placement policies: frozen data and pure functions, no torch.

A policy looks at the shape of the model (``ModelLayout``: its streamable units, the decoder
blocks today, and what any plan costs in compute-side memory) and returns a ``Plan``: how many
uploads may run ahead of the unit being computed (``depth``) and which units stay on the
compute device for the whole run (``resident``). The runtime turns a plan into a task graph
(``zoruntime.runtime.graph``); a policy knows nothing about tasks, lanes, devices or tensors.

Writing your own: any object with ``plan(layout: ModelLayout) -> Plan`` is a policy; one with a
``unit`` attribute ("block", "half" or "linear") also chooses how finely the runtime cuts the
decoder blocks into units (see ``UNIT_KINDS``), before ``plan`` sees the layout.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..planning.memory import ModelLayout

UNIT_KINDS = ("block", "half", "linear")
"""How finely decoder blocks are streamed: whole, as their attention and MLP halves, or a unit
per linear layer (norms and biases riding with a neighbour). Finer units need smaller slots."""


def check_unit(unit: object) -> None:
    if unit not in UNIT_KINDS:
        raise ValueError(f"unit must be one of {', '.join(map(repr, UNIT_KINDS))}, not {unit!r}")


def unit_of(policy: object) -> str:
    """The unit ``policy`` has the runtime stream: its ``unit`` attribute, "block" without one;
    a ``ValueError`` naming the policy for any other value (None too)."""
    unit = getattr(policy, "unit", "block")
    if unit not in UNIT_KINDS:
        raise ValueError(f"{type(policy).__name__}.unit must be one of {', '.join(map(repr, UNIT_KINDS))} (or no "
                         f"unit attribute: whole blocks), not {unit!r}")  # fmt: skip
    return unit


@dataclass(frozen=True, slots=True)
class Plan:
    """``depth``: uploads in flight ahead of the computing unit; ``resident``: units never streamed
    (numbered in model order among the streamable units, so today block indexes).

    Depth 0 is fully serial (one slot: upload, compute and offload of a unit, then the next).
    Depth k >= 1 keeps ``k + 2`` slots: k units prefetched, one computing, one offloading.
    Depth 1 is Algorithm 1 of ZO2.

    ``offload_every``: streamed units are written back to the host every k-th step only (the
    steps whose index is ``k − 1`` modulo k). In between, a unit's slot copy is dropped after its
    compute and the host master lags; the next upload applies every update it missed, in order,
    so the weights stay bitwise those of offloading every step, with fewer bytes sent down.
    """

    depth: int
    resident: frozenset[int] = frozenset()
    offload_every: int = 1

    def __post_init__(self) -> None:
        resident = self.resident
        if isinstance(resident, str | bytes) or not isinstance(resident, Iterable):
            raise ValueError(f"resident must be a set of unit numbers (ints), got {resident!r}")
        resident = frozenset(resident)  # a list or set given is copied: the plan cannot change later
        if any(not isinstance(u, int) or isinstance(u, bool) for u in resident):
            raise ValueError(f"resident must be a set of unit numbers (ints), got {self.resident!r}")
        object.__setattr__(self, "resident", resident)
        if not isinstance(self.depth, int) or isinstance(self.depth, bool) or self.depth < 0:
            raise ValueError(
                f"prefetch depth must be an int >= 0 (0 = serial, 1 = ZO2's Algorithm 1), got {self.depth!r}"
            )
        if not isinstance(self.offload_every, int) or isinstance(self.offload_every, bool) or self.offload_every < 1:
            raise ValueError(
                f"offload_every must be an int >= 1 (1 = write every streamed unit back every step), "
                f"got {self.offload_every!r}"
            )

    def offloads_at(self, step: int) -> bool:
        """Whether step ``step`` writes its streamed units back to the host."""
        return step % self.offload_every == self.offload_every - 1

    def streamed(self, num_units: int) -> list[int]:
        """Units uploaded and offloaded every step, in model order."""
        return [u for u in range(num_units) if u not in self.resident]

    def slots(self, num_units: int) -> int:
        """Compute-side buffers used for streaming."""
        return min(len(self.streamed(num_units)), slots_for_depth(self.depth))

    def validate(self, num_units: int) -> None:
        bad = sorted(u for u in self.resident if not 0 <= u < num_units)
        if bad:
            raise ValueError(f"resident units {bad} do not exist: the model has units 0..{num_units - 1}")


def slots_for_depth(depth: int) -> int:
    """Streaming slots needed at a prefetch depth (one for serial, k + 2 for depth k >= 1)."""
    return 1 if depth == 0 else depth + 2


@runtime_checkable
class Policy(Protocol):
    """Anything with ``plan``; called once when the runtime opens."""

    def plan(self, layout: ModelLayout) -> Plan: ...


def plan_for(policy: Policy, layout: ModelLayout) -> Plan:
    """``policy.plan(layout)``, checked: a ``Plan`` whose resident units the layout has."""
    plan = policy.plan(layout)
    if not isinstance(plan, Plan):
        raise TypeError(
            f"{type(policy).__name__}.plan(layout) must return a zoruntime.policies.Plan, got {plan!r} "
            "(e.g. Plan(depth=1, resident=frozenset({0, 1})))"
        )
    plan.validate(layout.num_units)
    return plan


@dataclass(frozen=True, slots=True)
class FixedDepth:
    """Stream every unit with ``depth`` uploads running ahead (0 = serial, 1 = ZO2's Algorithm 1),
    writing them back every ``offload_every`` steps (see ``Plan``); blocks cut into ``unit``s."""

    depth: int = 1
    offload_every: int = 1
    unit: str = "block"

    def __post_init__(self) -> None:
        Plan(self.depth, offload_every=self.offload_every)  # validates
        check_unit(self.unit)

    def plan(self, layout: ModelLayout) -> Plan:
        return Plan(self.depth, offload_every=self.offload_every)


def spread(count: int, num_units: int) -> frozenset[int]:
    """``count`` unit indices spread evenly over ``range(num_units)``.

    Even spacing keeps the upload lane busy: between two streamed units the compute lane has
    the resident ones to work on, instead of a run of resident units that starves uploads.
    """
    if count >= num_units:
        return frozenset(range(num_units))
    return frozenset(int((i + 0.5) * num_units / count) for i in range(count))


@dataclass(frozen=True, slots=True)
class MemoryBudget:
    """Keep as many units resident as ``budget_bytes`` allows beside the streaming slots.

    The budget covers what the streamable units take on the compute device (the memory model's
    ``units`` part): resident units, the slots for the prefetch depth and their working buffers;
    the embedding and head group, always there, come on top. When every unit fits, nothing is
    streamed.
    """

    budget_bytes: int
    depth: int = 1
    offload_every: int = 1
    unit: str = "block"

    def __post_init__(self) -> None:
        Plan(self.depth, offload_every=self.offload_every)
        check_unit(self.unit)
        if not isinstance(self.budget_bytes, int) or self.budget_bytes < 0:
            raise ValueError(f"memory budget must be a whole number of bytes >= 0, got {self.budget_bytes!r}")

    def plan(self, layout: ModelLayout) -> Plan:
        n = layout.num_units
        everything = Plan(self.depth, frozenset(range(n)), self.offload_every)
        if layout.breakdown(everything).units <= self.budget_bytes:
            return everything
        streaming = layout.breakdown(Plan(self.depth)).units
        if streaming > self.budget_bytes:
            slots = Plan(self.depth).slots(n)
            raise ValueError(
                f"memory budget of {self.budget_bytes:,} bytes is too small: depth {self.depth} streams through "
                f"{slots} slots of {layout.unit_bytes:,} bytes plus its working buffers, {streaming:,} "
                "bytes in all; raise the budget to at least that or lower the depth"
            )
        resident = min(n - 1, (self.budget_bytes - streaming) // layout.unit_bytes)
        return Plan(self.depth, spread(resident, n), self.offload_every)


def out_of_memory_advice(
    layout: ModelLayout, plan: Plan, free_bytes: int, what: str, finer: Mapping[str, ModelLayout] | None = None
) -> str:
    """Says how much ``plan`` needed, how much was free, and which plan would fit: a smaller depth,
    else the same model cut into finer units (``finer``: its layout for each unit it can be cut into)."""
    gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
    need = layout.bytes_needed(plan)
    text = f"out of device memory: {what} needs {gib(need)} for its buffers, {gib(free_bytes)} is free"
    for depth in (2, 1, 0):
        if depth < plan.depth or (depth == plan.depth and plan.resident):
            fits = layout.bytes_needed(Plan(depth))
            if fits < 0.9 * free_bytes:
                return f"{text}; FixedDepth({depth}) needs {gib(fits)} and would fit (activations come on top)"
    for depth in (1, 0):  # overlap first: finer units at depth 1 beat coarser ones streamed serially
        for unit, cut in (finer or {}).items():
            fits = cut.bytes_needed(Plan(depth))
            if fits < 0.9 * free_bytes:
                return (f"{text}; FixedDepth({depth}, unit={unit!r}) streams smaller units and needs {gib(fits)}: it "
                        "would fit (activations come on top)")  # fmt: skip
    return f"{text}; even FixedDepth(0) needs {gib(layout.bytes_needed(Plan(0)))}: use a bigger GPU"
