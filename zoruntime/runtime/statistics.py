"""``RuntimeStatistics``: a snapshot of an open runtime's counts and plan, as ``rt.statistics()``
returns it. Stdlib only; knows nothing of how the figures are gathered."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RuntimeStatistics:
    """A snapshot of the runtime: steps done, the plan, compute-side memory, steps skipped or failed."""

    steps: int
    num_units: int  # units a plan places (the decoder blocks today)
    depth: int
    resident_units: tuple[int, ...]
    slots: int
    unit_bytes: int  # the largest streamable unit
    compute_bytes: int  # every compute-side buffer (the memory model's figure), before activations
    pending_update: bool
    skipped_steps: int  # a loss was not finite: no update
    failed_steps: int  # a task raised: the step was abandoned, the weights kept
    world_size: int  # data-parallel ranks (1: not distributed)
    bytes_all_reduced: int  # between ranks, in all steps and evaluations so far
