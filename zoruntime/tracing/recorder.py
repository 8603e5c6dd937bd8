"""The timeline recorder: an instrument that keeps one span per task (lane, kind, unit, step,
bytes, start, end), and the timeline it fills. Stdlib only (exports import what they need).

Created only when tracing is asked for; with tracing off no recorder exists and the
scheduler makes no hook calls. Knows nothing about how spans are drawn or exported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..runtime.graph import Task

if TYPE_CHECKING:
    from .summary import TimelineSummary


@dataclass(frozen=True, slots=True)
class Span:
    """One task's run: seconds on the runtime's clock."""

    step: int
    index: int
    lane: str
    kind: str
    unit: str  # what the task acted on: a unit ("embed", "block.3", "head") or a group ("embed_head")
    start: float
    end: float
    deps: tuple[int, ...] = ()
    slot: int | None = None
    bytes: int = 0
    phase: str = "step"
    ahead: bool = False  # an upload for the next pass, which that pass's first compute on the slot uses
    issued: float | None = None  # when the host handed the task to its lane (on CUDA: began to enqueue it)
    attempt: int = 0  # the how-many-th pass of this step and phase (a retry after a failure, a second eval)
    abandoned: bool = False  # its pass failed (a later attempt ran the step again)

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def name(self) -> str:
        name = self.kind if self.unit == self.kind else f"{self.kind} {self.unit}"
        return f"{name} (ahead)" if self.ahead else name

    @property
    def block(self) -> int | None:
        """The block index of a ``block.N`` unit, None for anything else."""
        stage, _, index = self.unit.partition(".")
        return int(index) if stage == "block" and index.isdigit() else None


@dataclass(frozen=True, slots=True)
class StepMark:
    """From the call's start until its result was in hand (a step's last offloads and the
    uploads ahead may end later: their spans say when)."""

    step: int
    start: float
    end: float
    phase: str = "step"
    attempt: int = 0  # as the spans': which pass of this step and phase

    @property
    def name(self) -> str:
        return f"step {self.step}" if self.phase == "step" else f"{self.phase} (before step {self.step})"


class Timeline:
    """Spans and step marks in the order they were recorded."""

    def __init__(self, spans: list[Span] | None = None, steps: list[StepMark] | None = None) -> None:
        self.spans: list[Span] = spans or []
        self.steps: list[StepMark] = steps or []

    def for_step(self, step: int, phase: str = "step") -> list[Span]:
        """The spans of the last pass of ``step`` and ``phase`` that was not abandoned."""
        spans = [s for s in self.spans if s.step == step and s.phase == phase and not s.abandoned]
        last = max((s.attempt for s in spans), default=0)
        return [s for s in spans if s.attempt == last]

    def training_steps_from(self, first: int) -> Timeline:
        """A timeline of the training steps from ``first`` on (no eval, flush or load runs)."""
        return self.training_steps(first, None)

    def training_steps(self, first: int, stop: int | None) -> Timeline:
        """A timeline of the training steps ``first`` … ``stop − 1`` (None: to the last)."""
        keep = lambda step: step >= first and (stop is None or step < stop)  # noqa: E731
        return Timeline(
            [s for s in self.spans if s.phase == "step" and keep(s.step)],
            [m for m in self.steps if m.phase == "step" and keep(m.step)],
        )

    @property
    def training_step_numbers(self) -> list[int]:
        return sorted({m.step for m in self.steps if m.phase == "step"})

    @property
    def makespan(self) -> float:
        """From the first task's start to the last task's end, over every recorded step."""
        if not self.spans:
            return 0.0
        return max(s.end for s in self.spans) - min(s.start for s in self.spans)

    # -- views, exports (imported on use: matplotlib only when a picture is asked for) ------------
    def save_chrome_trace(self, path: str | Path) -> Path:
        """Chrome Trace Event JSON (Perfetto, chrome://tracing): lanes as threads, steps as a track."""
        from .chrome import save_chrome_trace

        return save_chrome_trace(self, path)

    def save_png(self, path: str | Path, size: tuple[int, int] = (1600, 480), recorded: int | None = None) -> Path:
        """Lanes as rows over time, coloured by task kind, each step's start labelled; ``size`` in
        pixels; ``recorded``: the training steps of the whole trace, when this is a window of it."""
        from .plot import save_png

        return save_png(self, path, size, recorded)

    def summary(self, show: bool = False) -> TimelineSummary:
        """Busy fraction per lane, achieved GB/s, overlap efficiency, largest compute-lane gaps.

        Pure unless ``show=True``, which also prints it (``result.render()`` is the same text)."""
        from .summary import summarize

        result = summarize(self)
        if show:
            print(result.render())
        return result

    @classmethod
    def load(cls, path: str | Path) -> Timeline:
        """A timeline saved by ``save_chrome_trace``."""
        from .chrome import load_chrome_trace

        return load_chrome_trace(path)


class TimelineRecorder:
    """Instrument that fills a ``Timeline``; ``bytes_of(task)`` gives the bytes a task moves."""

    def __init__(self, timeline: Timeline | None = None, bytes_of: Callable[[Task], int] | None = None) -> None:
        self.timeline = timeline or Timeline()
        self.bytes_of = bytes_of
        # Keyed by pass (step and phase): a pass's last tasks finish while the next one runs. The
        # runtime never starts a pass while one of the same step and phase still runs behind, so
        # every event of a pass comes between its start and the next one's of that step and phase.
        self._issued: dict[tuple[int, str, int], float] = {}
        self._started: dict[tuple[int, str, int], float] = {}
        self._step_start: dict[tuple[int, str], float] = {}
        self._attempt: dict[tuple[int, str], int] = {}  # the current pass of (step, phase): 0, 1, ...

    def step_started(self, step: int, time: float, phase: str) -> None:
        key = (step, phase)
        self._attempt[key] = self._attempt[key] + 1 if key in self._attempt else 0
        self._step_start[key] = time

    def abandoned(self, step: int, phase: str) -> None:
        """The current pass of ``step`` and ``phase`` failed: its spans are marked abandoned (the
        runtime calls this once the pass's lanes have stopped)."""
        attempt = self._attempt.get((step, phase), 0)
        self._step_start.pop((step, phase), None)
        self.timeline.spans[:] = [
            replace(s, abandoned=True) if (s.step, s.phase, s.attempt) == (step, phase, attempt) else s
            for s in self.timeline.spans
        ]

    def task_issued(self, step: int, task: Task, time: float) -> None:
        self._issued[step, task.phase, task.index] = time

    def task_started(self, step: int, task: Task, time: float) -> None:
        self._started[step, task.phase, task.index] = time

    def task_finished(self, step: int, task: Task, time: float) -> None:
        start = self._started.pop((step, task.phase, task.index))
        issued = self._issued.pop((step, task.phase, task.index), None)
        moved = self.bytes_of(task) if self.bytes_of else 0
        self.timeline.spans.append(
            Span(
                step,
                task.index,
                task.lane.value,
                task.kind.value,
                task.subject,
                start,
                time,
                task.deps,
                task.slot,
                moved,
                task.phase,
                task.ahead,
                issued,
                self._attempt.get((step, task.phase), 0),
            )
        )

    def step_finished(self, step: int, time: float, phase: str) -> None:
        attempt = self._attempt.get((step, phase), 0)
        self.timeline.steps.append(StepMark(step, self._step_start.pop((step, phase)), time, phase, attempt))
