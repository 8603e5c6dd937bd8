"""Instrument hooks: optional observers called as tasks are issued, start and finish. Stdlib only.

An instrument is any object defining some of the hook methods below; hooks it does not
define are never called, and with no instruments the scheduler makes no hook calls at all
(trio's instrumentation model). Hooks run on the event-loop thread and must not block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from .graph import Task

HOOKS = ("step_started", "task_issued", "task_started", "task_finished", "step_finished")


class Instrument(Protocol):
    """All hooks are optional; times are seconds on the scheduler's clock. ``phase`` names the
    graph being run: "step" (training), "eval", "flush" or "load"."""

    def step_started(self, step: int, time: float, phase: str) -> None: ...
    def task_issued(self, step: int, task: Task, time: float) -> None: ...
    def task_started(self, step: int, task: Task, time: float) -> None: ...
    def task_finished(self, step: int, task: Task, time: float) -> None: ...
    def step_finished(self, step: int, time: float, phase: str) -> None: ...


class Instruments:
    """Per-hook lists of bound methods; ``hook in instruments`` is False when nobody listens."""

    def __init__(self, instruments: Iterable[object] = ()) -> None:
        self._hooks: dict[str, list[Callable[..., None]]] = {}
        for instrument in instruments:
            self.add(instrument)

    def add(self, instrument: object) -> None:
        found = [h for h in HOOKS if callable(getattr(instrument, h, None))]
        if not found:
            raise TypeError(f"{type(instrument).__name__} defines none of the instrument hooks {HOOKS}")
        for hook in found:
            self._hooks.setdefault(hook, []).append(getattr(instrument, hook))

    def __contains__(self, hook: str) -> bool:
        return hook in self._hooks

    def __bool__(self) -> bool:
        return bool(self._hooks)

    def call(self, hook: str, *args: Any) -> None:
        for method in self._hooks.get(hook, ()):
            method(*args)
