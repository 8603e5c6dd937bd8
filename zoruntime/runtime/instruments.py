"""Instrument hooks: optional observers called as tasks are issued, start and finish. Stdlib only.

An instrument is any object defining some of the hook methods below; hooks it does not
define are never called, and with no instruments the scheduler makes no hook calls at all
(trio's instrumentation model). Hooks run on the event-loop thread and must not block.

A hook that raises never fails the step, the flush or the other instruments: as in trio, its
instrument is removed (none of its hooks is called again) and the failure is logged once, with
its traceback, as an error on the ``zoruntime.runtime.instruments`` logger.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from .graph import Task

_LOG = logging.getLogger(__name__)

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
    """Per-hook lists of (instrument, bound method); ``hook in instruments`` is False when nobody
    listens (any more)."""

    def __init__(self, instruments: Iterable[object] = ()) -> None:
        self._hooks: dict[str, list[tuple[object, Callable[..., None]]]] = {}
        for instrument in instruments:
            self.add(instrument)

    def add(self, instrument: object) -> None:
        """Call ``instrument``'s hooks from now on; adding it again does nothing (as in trio)."""
        found = [h for h in HOOKS if callable(getattr(instrument, h, None))]
        if not found:
            raise TypeError(f"{type(instrument).__name__} defines none of the instrument hooks {HOOKS}")
        if any(added is instrument for added, _ in self._hooks.get(found[0], ())):
            return
        for hook in found:
            self._hooks.setdefault(hook, []).append((instrument, getattr(instrument, hook)))

    def _remove(self, instrument: object) -> None:
        """Drop every hook of ``instrument``; the lists are replaced, not changed, so a ``call``
        iterating one goes on with the others."""
        for hook, methods in list(self._hooks.items()):
            kept = [entry for entry in methods if entry[0] is not instrument]
            if kept:
                self._hooks[hook] = kept
            else:
                del self._hooks[hook]

    def __contains__(self, hook: str) -> bool:
        return hook in self._hooks

    def __bool__(self) -> bool:
        return bool(self._hooks)

    def call(self, hook: str, *args: Any) -> None:
        """Call ``hook`` on every instrument defining it; one that raises is removed and logged."""
        for instrument, method in self._hooks.get(hook, ()):
            try:
                method(*args)
            except Exception:
                self._remove(instrument)
                _LOG.exception(
                    "Exception raised when calling %r on instrument %r - instrument removed", hook, instrument
                )
