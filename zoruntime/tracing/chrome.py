"""Chrome Trace Event JSON: write a timeline for Perfetto / chrome://tracing, and read it back.

Each lane is a named thread of one process; steps are spans on a separate "steps" thread.
Every task is a complete event (``ph: "X"``, ``ts`` and ``dur`` in microseconds) whose args
carry what the timeline needs to be rebuilt (step, task index, kind, unit, deps, slot, bytes,
when the host issued it) and the achieved GB/s of transfers. Stdlib only.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..runs import replace_file
from .recorder import Span, StepMark, Timeline

LANES = ("upload", "compute", "offload")
_STEPS_TID = 0
_PID = 1


def _tid(lane: str) -> int:
    return LANES.index(lane) + 1 if lane in LANES else len(LANES) + 1


def events(timeline: Timeline) -> Iterator[dict[str, Any]]:
    """The trace's events, one at a time: the process and lanes named, then the steps, then the tasks."""
    starts = itertools.chain((s.start for s in timeline.spans), (m.start for m in timeline.steps))
    origin = min(starts, default=0.0)
    us = lambda t: round((t - origin) * 1e6, 3)  # noqa: E731
    yield {"ph": "M", "name": "process_name", "pid": _PID, "tid": 0, "args": {"name": "zoruntime"}}
    yield {"ph": "M", "name": "thread_name", "pid": _PID, "tid": _STEPS_TID, "args": {"name": "steps"}}
    for lane in sorted({s.lane for s in timeline.spans}, key=_tid):
        tid = _tid(lane)
        yield {"ph": "M", "name": "thread_name", "pid": _PID, "tid": tid, "args": {"name": lane}}
        yield {"ph": "M", "name": "thread_sort_index", "pid": _PID, "tid": tid, "args": {"sort_index": tid}}
    for mark in timeline.steps:
        start, dur = us(mark.start), us(mark.end) - us(mark.start)
        yield {"ph": "X", "name": mark.name, "cat": "step", "pid": _PID, "tid": _STEPS_TID, "ts": start, "dur": dur,
               "args": {"step": mark.step, "phase": mark.phase, "attempt": mark.attempt}}  # fmt: skip
    for span in timeline.spans:
        args: dict[str, Any] = {
            "step": span.step, "index": span.index, "kind": span.kind, "unit": span.unit,
            "deps": list(span.deps), "slot": span.slot, "bytes": span.bytes, "phase": span.phase, "ahead": span.ahead,
        }  # fmt: skip
        if span.attempt or span.abandoned:  # a second pass of its step and phase, or a failed one
            args |= {"attempt": span.attempt, "abandoned": span.abandoned}
        if span.issued is not None:
            args["issued_us"] = us(span.issued)  # on the trace's clock, like ts
        if span.bytes and span.duration > 0:
            args["GB/s"] = round(span.bytes / span.duration / 1e9, 3)
        yield {"ph": "X", "name": span.name, "cat": span.kind, "pid": _PID, "tid": _tid(span.lane),
               "ts": us(span.start), "dur": us(span.end) - us(span.start), "args": args}  # fmt: skip


def save_chrome_trace(timeline: Timeline, path: str | Path) -> Path:
    """``{"traceEvents": [...], "displayTimeUnit": "ms"}``, as ``json.dumps`` writes it, written
    an event at a time (a long run's events, held at once, took several times its spans' memory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    listed = (("" if i == 0 else ", ") + json.dumps(event) for i, event in enumerate(events(timeline)))
    replace_file(path, itertools.chain(['{"traceEvents": ['], listed, ['], "displayTimeUnit": "ms"}']))
    return path


def load_chrome_trace(path: str | Path) -> Timeline:
    try:
        document = json.loads(Path(path).read_text())
        events = document["traceEvents"] if isinstance(document, dict) else document
        lanes = {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e["name"] == "thread_name"}
        spans, steps = [], []
        for e in events:
            if e.get("ph") != "X":
                continue
            start, end = e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6
            a = e["args"]
            if e.get("cat") == "step":
                steps.append(StepMark(a["step"], start, end, a["phase"], a.get("attempt", 0)))
            else:
                ahead = a.get("ahead", False)  # traces from before steps overlapped have none
                issued = a["issued_us"] / 1e6 if "issued_us" in a else None  # nor from before issue times
                spans.append(Span(a["step"], a["index"], lanes[e["tid"]], a["kind"], a["unit"], start, end,
                                  tuple(a["deps"]), a["slot"], a["bytes"], a["phase"], ahead, issued,
                                  a.get("attempt", 0), a.get("abandoned", False)))  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a zoruntime Chrome trace ({type(error).__name__}: {error})") from error
    return Timeline(spans, steps)
