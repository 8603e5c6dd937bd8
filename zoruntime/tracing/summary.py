"""What a timeline's training steps say in numbers (eval, flush and load runs are left out):
lane busy fractions, achieved transfer GB/s, overlap efficiency (the pipeline bound over the
measured step time), the largest idle gaps on the compute lane, each with the task it was
waiting for, and when the host issued the tasks against when they started (on CUDA, whether
the host kept ahead of the GPU). Stdlib only.

A step's window runs from its first task's start to its last task's end, taken from the spans
of its pass that returned, not of a failed attempt (on CUDA the GPU's own times, so a host that
starves the GPU shows). Consecutive steps overlap,
so the time measured is what the windows cover together, each moment once. The pipeline bound
of steps whose blocks are all streamed is ``OpFigures.pipeline_bound`` over all of them (one
fill, then the busiest lane) with the mean task times; when some blocks are resident it is the
busiest lane's total (no schedule beats either).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from ..planning.cost import OpFigures
from .recorder import Span, Timeline

_TOLERANCE = 1e-9
ON_ISSUE_SECONDS = 50e-6
"""A task that starts this soon after the host issued it started on issue: the device (or its
lane) was waiting for the host, not the host for the device."""


@dataclass(frozen=True, slots=True)
class Gap:
    """The compute lane idled ``seconds`` before ``task`` (of ``step``), waiting for ``waiting_for``."""

    step: int
    start: float
    seconds: float
    task: str
    waiting_for: str


@dataclass(frozen=True, slots=True)
class TimelineSummary:
    steps: int
    step_seconds: float  # mean measured step time
    lane_busy: dict[str, float] = field(default_factory=dict)  # busy fraction of the step time
    upload_gb_s: float | None = None
    offload_gb_s: float | None = None
    pipeline_bound_seconds: float = 0.0  # mean over steps
    overlap_efficiency: float = 0.0  # pipeline bound / measured step time
    largest_gaps: tuple[Gap, ...] = ()
    # When the host issued the tasks (spans that carry issue times only): the mean time from a
    # step's first task issued to its last, and how long after its issue each compute-lane task
    # started (the median, and the fraction that started within ON_ISSUE_SECONDS: on CUDA, where
    # the host enqueues ahead, those found the GPU waiting for the host).
    issue_seconds: float | None = None
    issue_to_start_seconds: float | None = None
    started_on_issue: float | None = None

    def render(self) -> str:
        if not self.steps:
            return "no training step in the timeline (evaluation, flush and load passes are left out)"
        lines = [
            f"{self.steps} step(s), {self.step_seconds * 1e3:.3f} ms per step; pipeline bound "
            f"{self.pipeline_bound_seconds * 1e3:.3f} ms; overlap efficiency {self.overlap_efficiency:.1%}",
            "lane busy: " + ", ".join(f"{lane} {busy:.1%}" for lane, busy in self.lane_busy.items()),
        ]
        rates = [(n, r) for n, r in (("upload", self.upload_gb_s), ("offload", self.offload_gb_s)) if r is not None]
        if rates:
            lines.append("achieved: " + ", ".join(f"{name} {rate:.2f} GB/s" for name, rate in rates))
        if self.issue_seconds is not None and self.issue_to_start_seconds is not None:
            lines.append(
                f"host: a step's tasks issued over {self.issue_seconds * 1e3:.3f} ms; compute-lane tasks started "
                f"{self.issue_to_start_seconds * 1e3:.3f} ms after their issue (median), {self.started_on_issue:.0%} "
                f"within {ON_ISSUE_SECONDS * 1e3:.2f} ms of it"
            )
        if self.largest_gaps:
            lines.append("largest compute-lane gaps:")
            lines += [
                f"  step {g.step}: {g.seconds * 1e3:.3f} ms before {g.task}, waiting for {g.waiting_for}"
                for g in self.largest_gaps
            ]
        return "\n".join(lines)


def _step_window(spans: list[Span]) -> tuple[float, float]:
    """From a step's first task's start to its last task's end (on CUDA, the GPU's times)."""
    return min(s.start for s in spans), max(s.end for s in spans)


def _covered(windows: list[tuple[float, float]]) -> float:
    """Seconds covered by the windows, overlaps counted once (consecutive steps overlap)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(windows):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _bound(spans: list[Span], steps: int) -> float:
    """The pipeline bound of ``steps`` consecutive steps made of ``spans``: with every block
    streamed, ``OpFigures.pipeline_bound`` on the mean task times; else the busiest lane."""
    by_kind: dict[str, list[float]] = {}
    for s in spans:
        by_kind.setdefault(s.kind, []).append(s.duration)
    computes = [s for s in spans if s.kind in ("compute", "eval")]
    if computes and all(s.slot is not None for s in computes):
        embed, head = _mean(by_kind.get("embed", [])), _mean(by_kind.get("head", []))
        figures = OpFigures(
            _mean(by_kind.get("upload", [])),
            _mean([s.duration for s in computes]),
            _mean(by_kind.get("offload", [])),
            embed,
            head,
        )
        return figures.pipeline_bound(len(computes) // steps, steps)
    lanes: dict[str, float] = {}
    for s in spans:
        lanes[s.lane] = lanes.get(s.lane, 0.0) + s.duration
    return max(lanes.values(), default=0.0)


def _gaps(step: int, spans: list[Span], step_start: float) -> list[Gap]:
    """Idle stretches of the compute lane, each with what it waited for: the dependency that
    finished last, if it finished during the gap, else nothing was pending and the task was
    issued late (by the scheduler on a CPU; on a GPU, the host had not enqueued it yet)."""
    by_index = {s.index: s for s in spans}
    compute = sorted((s for s in spans if s.lane == "compute"), key=lambda s: s.start)
    gaps, previous_end = [], step_start
    for span in compute:
        idle = span.start - previous_end
        if idle > _TOLERANCE:
            deps = [by_index[d] for d in span.deps if d in by_index]
            latest = max(deps, key=lambda d: d.end, default=None)
            if latest is not None and latest.end > previous_end + _TOLERANCE:
                blocker = latest.name
            elif span.issued is not None and span.issued > previous_end + _TOLERANCE:
                blocker = f"the host (it issued the task {(span.issued - previous_end) * 1e3:.3f} ms into the gap)"
            else:
                blocker = "the scheduler (no dependency pending)"
            gaps.append(Gap(step, previous_end, idle, span.name, blocker))
        previous_end = max(previous_end, span.end)
    return gaps


def summarize(timeline: Timeline, gaps: int = 5) -> TimelineSummary:
    steps = sorted({s.step for s in timeline.spans if s.phase == "step" and not s.abandoned})
    if not steps:
        return TimelineSummary(steps=0, step_seconds=0.0)
    windows, all_gaps, spans_of_steps, issue_spreads = [], [], [], []
    busy: dict[str, float] = {}
    for step in steps:
        spans = timeline.for_step(step)
        spans_of_steps += spans
        window = _step_window(spans)
        windows.append(window)
        for s in spans:
            busy[s.lane] = busy.get(s.lane, 0.0) + s.duration
        issued = [s.issued for s in spans if s.issued is not None]
        if issued:
            issue_spreads.append(max(issued) - min(issued))
        all_gaps += _gaps(step, spans, window[0])
    total = _covered(windows)

    def rate(kind: str) -> float | None:
        moved = [s for s in spans_of_steps if s.kind == kind and s.bytes]
        seconds = sum(s.duration for s in moved)
        return sum(s.bytes for s in moved) / seconds / 1e9 if moved and seconds > 0 else None

    step_seconds = total / len(steps)
    bound = _bound(spans_of_steps, len(steps)) / len(steps)
    leads = sorted(s.start - s.issued for s in spans_of_steps if s.lane == "compute" and s.issued is not None)
    order = {"upload": 0, "compute": 1, "offload": 2}
    return TimelineSummary(
        steps=len(steps),
        step_seconds=step_seconds,
        lane_busy={lane: busy[lane] / total for lane in sorted(busy, key=lambda n: order.get(n, 9))},
        upload_gb_s=rate("upload"),
        offload_gb_s=rate("offload"),
        pipeline_bound_seconds=bound,
        overlap_efficiency=bound / step_seconds if step_seconds > 0 else 0.0,
        largest_gaps=tuple(sorted(all_gaps, key=lambda g: -g.seconds)[:gaps]),
        issue_seconds=_mean(issue_spreads) if issue_spreads else None,
        issue_to_start_seconds=statistics.median(leads) if leads else None,
        started_on_issue=sum(lead <= ON_ISSUE_SECONDS for lead in leads) / len(leads) if leads else None,
    )
