"""Test doubles shipped with the library.

``simulate`` (from ``zoruntime.planning``) runs the real scheduler on the simulated backend:
"how long would a step take with these per-block figures and this policy?" without tensors or
threads, on a virtual clock, in milliseconds of real time. ``inject_faults`` makes chosen
tasks of a real runtime fail, for testing that a failed step damages nothing.
``check_timeline`` asserts that a timeline (simulated or recorded) obeys the schedule's rules.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from .planning.simulate import simulate
from .runtime import Task
from .tracing import Timeline

__all__ = ["InjectedFault", "check_timeline", "inject_faults", "simulate"]

_SLACK = 1e-12


def check_timeline(timeline: Timeline) -> None:
    """Raise ``AssertionError`` unless: each lane runs one task at a time; a task starts after
    its dependencies (in its own pass, or, for the first compute on a slot, after the upload
    that an earlier pass did ahead into it; a second pass of one step and phase, a retry or
    another evaluation, is its own); and a slot's tasks never interleave across units
    (an upload starts after every earlier task on its slot has ended)."""
    by_index = {(s.step, s.phase, s.attempt, s.index): s for s in timeline.spans}
    ahead = sorted((s for s in timeline.spans if s.ahead), key=lambda s: s.end)
    for lane in {s.lane for s in timeline.spans}:
        spans = sorted((s for s in timeline.spans if s.lane == lane), key=lambda s: s.start)
        for a, b in itertools.pairwise(spans):
            assert a.end <= b.start + _SLACK, f"{a.name} and {b.name} overlap on the {lane} lane"
    for span in timeline.spans:
        for dep in span.deps:
            done = by_index.get((span.step, span.phase, span.attempt, dep))
            if done is None:  # the upload came ahead, from the pass before
                done = next(s for s in reversed(ahead) if s.slot == span.slot and s.start <= span.start)
            assert done.end <= span.start + _SLACK, f"{span.name} (step {span.step}) started before {done.name}"
    for slot in {s.slot for s in timeline.spans if s.slot is not None}:
        spans = sorted((s for s in timeline.spans if s.slot == slot), key=lambda s: (s.start, s.end))
        for i, span in enumerate(spans):
            if span.kind == "upload":
                late = [e.name for e in spans[:i] if e.end > span.start + _SLACK]
                assert not late, f"{span.name} filled slot {slot} while {late} still used it"


class InjectedFault(RuntimeError):
    """Raised by ``inject_faults`` inside a task."""


def inject_faults(runtime: Any, should_fail: Callable[[int, Task], bool]) -> list[tuple[int, str]]:
    """Make the tasks of an open ``Runtime`` raise ``InjectedFault`` where ``should_fail(step, task)``.

    The fault is raised when the task's work starts, as a failing kernel or allocation would.
    Returns the list that records (step, task) of every injected fault.
    """
    work = runtime._work
    if work is None:
        raise RuntimeError("open the runtime before injecting faults")
    original = work.for_task
    injected: list[tuple[int, str]] = []

    def for_task(task: Task) -> Callable[[], None]:
        callable_ = original(task)
        step = work.state.step if work.state is not None else runtime.step_index
        if not should_fail(step, task):
            return callable_

        def failing() -> None:
            injected.append((step, str(task)))
            raise InjectedFault(f"fault injected into {task} of step {step}")

        return failing

    setattr(work, "for_task", for_task)  # noqa: B010 (an instance attribute over the method)
    return injected
