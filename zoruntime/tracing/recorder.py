"""The timeline recorder: an instrument that keeps one span per task (lane, kind, block, step,
start, end). Stdlib only.

Created only when tracing is asked for; with tracing off no recorder exists and the
scheduler makes no hook calls. Knows nothing about how spans are drawn or exported.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..runtime.graph import Task


@dataclass(frozen=True, slots=True)
class Span:
    """One task's run: seconds on the runtime's clock."""

    step: int
    index: int
    lane: str
    kind: str
    block: int | None
    start: float
    end: float
    deps: tuple[int, ...] = ()
    slot: int | None = None

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class StepMark:
    step: int
    start: float
    end: float


class Timeline:
    """Spans and step marks in the order they were recorded."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.steps: list[StepMark] = []

    def for_step(self, step: int) -> list[Span]:
        return [s for s in self.spans if s.step == step]

    @property
    def makespan(self) -> float:
        """From the first task's start to the last task's end, over every recorded step."""
        if not self.spans:
            return 0.0
        return max(s.end for s in self.spans) - min(s.start for s in self.spans)


class TimelineRecorder:
    """Instrument that fills a ``Timeline``."""

    def __init__(self, timeline: Timeline | None = None) -> None:
        self.timeline = timeline or Timeline()
        self._started: dict[tuple[int, int], float] = {}
        self._step_start: dict[int, float] = {}

    def step_started(self, step: int, time: float) -> None:
        self._step_start[step] = time

    def task_started(self, step: int, task: Task, time: float) -> None:
        self._started[step, task.index] = time

    def task_finished(self, step: int, task: Task, time: float) -> None:
        start = self._started.pop((step, task.index))
        self.timeline.spans.append(
            Span(step, task.index, task.lane.value, task.kind.value, task.block, start, time, task.deps, task.slot)
        )

    def step_finished(self, step: int, time: float) -> None:
        self.timeline.steps.append(StepMark(step, self._step_start.pop(step), time))
