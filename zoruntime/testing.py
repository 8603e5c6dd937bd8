"""Test doubles shipped with the library.

``simulate`` (from ``zoruntime.planning``) runs the real scheduler on the simulated backend:
"how long would a step take with these per-block figures and this policy?" without tensors or
threads, on a virtual clock, in milliseconds of real time. ``inject_faults`` makes chosen
tasks of a real runtime fail, for testing that a failed step damages nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .planning.simulate import simulate
from .runtime import Task

__all__ = ["InjectedFault", "inject_faults", "simulate"]


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
