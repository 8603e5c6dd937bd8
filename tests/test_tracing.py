"""Timelines: Chrome trace format, lanes and dependencies, the PNG, the summary's numbers, the CLI,
and nothing at all when tracing is off."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import tiny_model, token_batch
from PIL import Image

import zoruntime
from zoruntime import engine
from zoruntime.policies import FixedDepth, OpFigures
from zoruntime.testing import check_timeline, simulate
from zoruntime.tracing import Timeline


@pytest.fixture(scope="module")
def cpu_timeline() -> Timeline:
    model = tiny_model(num_hidden_layers=4)

    async def run() -> Timeline:
        async with zoruntime.Runtime(model, zoruntime.ZOSGD(lr=1e-3), policy=FixedDepth(1), trace=True) as rt:
            for i in range(2):
                await rt.step(token_batch(model.config, seed=i))
            return rt.timeline

    return zoruntime.run(run())


def test_a_traced_cpu_run_has_one_span_per_task_with_bytes_and_steps(cpu_timeline: Timeline) -> None:
    step0 = cpu_timeline.for_step(0)
    assert sorted((s.kind, s.block) for s in step0 if s.kind != "upload") == sorted(
        [("embed", None), ("head", None)] + [(k, b) for b in range(4) for k in ("compute", "offload")]
    )
    block_bytes = zoruntime.OPTAdapter(tiny_model(num_hidden_layers=4)).block_layouts[0].nbytes
    assert all(s.bytes == block_bytes for s in step0 if s.kind in ("upload", "offload"))
    assert all(s.bytes == 0 for s in step0 if s.kind == "compute")
    marks = [(m.step, m.phase) for m in cpu_timeline.steps]
    assert marks == [(0, "load"), (0, "step"), (1, "step"), (2, "flush")]  # flush: leaving the runtime
    assert [m.name for m in cpu_timeline.steps] == ["load (before step 0)", "step 0", "step 1", "flush (before step 2)"]
    for span in cpu_timeline.spans:
        assert span.end >= span.start


def test_each_pass_uploads_the_first_blocks_of_the_next_one_ahead(cpu_timeline: Timeline) -> None:
    """Depth 1, 4 blocks, 3 slots: both steps end by uploading blocks 0 and 1 for the next pass,
    which takes them instead of uploading them again (the flush takes step 1's), into the slots
    that pass streams through (slots turn: 4 blocks move the start by one slot)."""
    uploads = {}
    for phase, step in (("step", 0), ("step", 1), ("flush", 2)):
        spans = cpu_timeline.for_step(step, phase)
        uploads[phase, step] = [(s.unit, s.slot, s.ahead) for s in spans if s.kind == "upload"]
    assert uploads["step", 0] == [(f"block.{b}", b % 3, False) for b in range(4)] + [
        ("block.0", 1, True),
        ("block.1", 2, True),
    ]
    assert uploads["step", 1] == [("block.2", 0, False), ("block.3", 1, False), ("block.0", 2, True),
                                  ("block.1", 0, True)]  # fmt: skip
    assert uploads["flush", 2] == [("block.2", 1, False), ("block.3", 2, False)]


def test_real_cpu_spans_respect_lanes_and_dependencies(cpu_timeline: Timeline) -> None:
    check_timeline(cpu_timeline)


def test_chrome_trace_has_the_required_fields_and_round_trips(cpu_timeline: Timeline, tmp_path: Path) -> None:
    path = cpu_timeline.save_chrome_trace(tmp_path / "trace.json")
    document = json.loads(path.read_text())
    events = document["traceEvents"]
    complete = [e for e in events if e["ph"] == "X"]
    assert all({"ph", "ts", "dur", "pid", "tid", "name"} <= e.keys() for e in complete)
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {"steps", "upload", "compute", "offload"}
    uploads = [e for e in complete if e["cat"] == "upload"]
    assert all(e["args"]["GB/s"] > 0 and e["args"]["bytes"] > 0 for e in uploads)
    assert {e["name"] for e in complete if e["cat"] == "step"} >= {"step 0", "step 1"}
    loaded = Timeline.load(path)
    assert len(loaded.spans) == len(cpu_timeline.spans)
    assert loaded.makespan == pytest.approx(cpu_timeline.makespan, abs=2e-6)
    assert sorted((s.step, s.index, s.kind, s.block, s.deps) for s in loaded.spans) == sorted(
        (s.step, s.index, s.kind, s.block, s.deps) for s in cpu_timeline.spans
    )
    for original, back in zip(cpu_timeline.spans, loaded.spans, strict=True):  # issued on the trace's clock too
        assert original.issued is not None and back.issued is not None
        assert back.start - back.issued == pytest.approx(original.start - original.issued, abs=2e-6)


def test_a_trace_is_written_an_event_at_a_time(cpu_timeline: Timeline, tmp_path: Path) -> None:
    """Saving built every event's dict, then the whole document as one string: a long run's
    save peaked at about five times what its spans held. It now writes one event at a time, the
    same bytes as the document dumped whole."""
    import tracemalloc

    from zoruntime.tracing.chrome import events

    long = Timeline([replace(s, step=s.step + 2 * k) for k in range(500) for s in cpu_timeline.spans],
                    [replace(m, step=m.step + 2 * k) for k in range(500) for m in cpu_timeline.steps])  # fmt: skip
    path = tmp_path / "trace.json"
    tracemalloc.start()
    long.save_chrome_trace(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    written = path.read_text()
    assert written == json.dumps({"traceEvents": list(events(long)), "displayTimeUnit": "ms"})
    assert peak < len(written) / 10  # an event and a write buffer, not the document (it was 5x)


def test_png_is_written_at_the_stated_size(cpu_timeline: Timeline, tmp_path: Path) -> None:
    path = cpu_timeline.save_png(tmp_path / "timeline.png", size=(1200, 360))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1200, 360)
    with pytest.raises(ValueError, match=r"at least 200 x 120 pixels"):
        cpu_timeline.save_png(tmp_path / "small.png", size=(100, 50))


@pytest.mark.parametrize(("depth", "expected"), [(1, 1.0), (0, (1 + 2 + 1 + 15 * 2) / 2 / (8 * 4))])
def test_summary_overlap_efficiency_matches_the_analytic_value(depth: int, expected: float) -> None:
    """Compute-bound (u = 1, c = 2, o = 1), 8 blocks, 2 steps: at depth 1 one fill for both
    steps, then computes back to back (17 per step); at depth 0 every block is serial (32)."""
    timeline = simulate(8, 1.0, 2.0, 1.0, FixedDepth(depth), steps=2, block_bytes=10**9)
    summary = timeline.summary()
    assert summary.pipeline_bound_seconds == pytest.approx(OpFigures(1.0, 2.0, 1.0).pipeline_bound(8, steps=2) / 2)
    assert summary.overlap_efficiency == pytest.approx(expected)
    makespan = 17.0 if depth else 32.0
    assert summary.step_seconds == pytest.approx(makespan)
    assert summary.lane_busy["compute"] == pytest.approx(16.0 / makespan)
    assert summary.lane_busy["upload"] == pytest.approx(8.0 / makespan)


def test_summary_is_pure_unless_asked_to_show(capsys: pytest.CaptureFixture[str]) -> None:
    timeline = simulate(4, 1.0, 2.0, 1.0, FixedDepth(1), steps=2, block_bytes=10**9)
    summary = timeline.summary()
    assert capsys.readouterr().out == ""
    assert timeline.summary(show=True) == summary
    assert capsys.readouterr().out == summary.render() + "\n"


def test_the_summary_of_a_timeline_without_training_steps_says_so(cpu_timeline: Timeline) -> None:
    """A trace of an evaluation alone read "0 step(s), 0.000 ms per step; pipeline bound 0.000 ms;
    overlap efficiency 0.0%" and "lane busy: " with nothing after it."""
    evaluations = Timeline([replace(s, phase="eval") for s in cpu_timeline.spans])
    expected = "no training step in the timeline (evaluation, flush and load passes are left out)"
    assert evaluations.summary().render() == Timeline().summary().render() == expected


def test_summary_names_what_the_compute_lane_waited_for() -> None:
    summary = simulate(6, 3.0, 1.0, 1.0, FixedDepth(1)).summary()  # upload-bound
    assert summary.largest_gaps[0].waiting_for.startswith("upload ")
    assert summary.largest_gaps[0].seconds == pytest.approx(3.0)  # the fill: compute 0 waits for upload 0
    assert summary.largest_gaps[1].seconds == pytest.approx(2.0)  # then each block waits u − c
    assert "waiting for upload" in summary.render()


def test_gaps_are_attributed_on_device_timestamps_too() -> None:
    # On a GPU a task starts a few microseconds after the event of what it waited for: the
    # wait is still that dependency's, not the scheduler's.
    simulated = simulate(6, 3.0, 1.0, 1.0, FixedDepth(1))
    late = [replace(s, start=s.start + 5e-6, end=s.end + 5e-6) if s.lane == "compute" else s for s in simulated.spans]
    summary = Timeline(late, simulated.steps).summary()
    assert [g.waiting_for for g in summary.largest_gaps[:3]] == ["upload block.0", "upload block.1", "upload block.2"]


def test_a_gap_with_nothing_pending_is_blamed_on_issuing_late() -> None:
    simulated = simulate(3, 0.1, 1.0, 0.1, FixedDepth(1))  # compute-bound: the only long gap is made below
    spans = sorted(simulated.spans, key=lambda s: s.start)
    head = next(s for s in spans if s.kind == "head")
    delayed = [replace(s, start=s.start + 0.5, end=s.end + 0.5) if s is head else s for s in spans]
    gaps = Timeline(delayed, simulated.steps).summary().largest_gaps
    assert (gaps[0].task, gaps[0].waiting_for) == ("head", "the scheduler (no dependency pending)")
    assert gaps[0].seconds == pytest.approx(0.5)


def test_trace_cli_summary_and_plot(cpu_timeline: Timeline, tmp_path: Path) -> None:
    trace = cpu_timeline.save_chrome_trace(tmp_path / "t.json")
    cli = [sys.executable, "-m", "zoruntime", "trace"]
    out = subprocess.run([*cli, "summary", str(trace)], capture_output=True, text=True, check=True).stdout
    assert "overlap efficiency" in out and "lane busy: upload" in out
    png = tmp_path / "out.png"
    subprocess.run([*cli, "plot", str(trace), "-o", str(png), "--size", "800x300"], check=True, capture_output=True)
    with Image.open(png) as image:
        assert image.size == (800, 300)
    bad = subprocess.run([*cli, "summary", str(tmp_path / "missing.json")], capture_output=True, text=True)
    assert bad.returncode == 2 and "is not a zoruntime Chrome trace" in bad.stderr


def _long_trace(tmp_path: Path, steps: int = 30) -> Path:
    timeline = simulate(4, 2.0, 1.0, 1.0, FixedDepth(1), steps=steps, host_gap_s=0.5)
    return timeline.save_chrome_trace(tmp_path / "long.json")


def test_a_long_trace_is_drawn_as_a_few_labelled_steps_that_the_picture_names(tmp_path: Path) -> None:
    from zoruntime.tracing.plot import draw

    timeline = Timeline.load(_long_trace(tmp_path))
    assert timeline.training_step_numbers == list(range(30))
    window = timeline.training_steps(10, 13)
    figure = draw(window, (800, 300), recorded=30)
    axes = figure.axes[0]
    assert axes.get_title(loc="left").startswith("steps 10-12 of the 30 recorded")
    assert [t.get_text() for t in axes.texts] == ["step 10", "step 11", "step 12"]
    assert len(axes.lines) == 4  # where each step starts, and where the last one ends
    whole = draw(timeline, (800, 300)).axes[0]
    assert whole.get_title(loc="left").startswith("steps 0-29,") and len(whole.lines) == 31


def test_trace_plot_takes_a_window_of_steps_and_defaults_to_the_last_few(tmp_path: Path, capsys) -> None:
    from zoruntime.cli import main as cli_main

    trace, png = _long_trace(tmp_path), tmp_path / "w.png"
    assert cli_main(["trace", "plot", str(trace), "-o", str(png), "--steps", "10:13"]) == 0
    assert f"wrote {png} (steps 10-12 of 30)" in capsys.readouterr().out and png.stat().st_size > 0
    assert cli_main(["trace", "plot", str(trace), "-o", str(png)]) == 0
    assert "(steps 27-29 of 30)" in capsys.readouterr().out
    assert cli_main(["trace", "plot", str(trace), "-o", str(png), "--steps", "25:"]) == 0
    assert "(steps 25-29 of 30)" in capsys.readouterr().out
    for bad, message in [("5", "give A:B, the steps A to B-1"), ("40:50", "no training step there: the trace holds "
                         "steps 0-29"), ("a:b", "give A:B")]:  # fmt: skip
        assert cli_main(["trace", "plot", str(trace), "-o", str(png), "--steps", bad]) == 2
        assert message in capsys.readouterr().err


@pytest.mark.asyncio
async def test_with_tracing_off_no_recorder_exists_and_no_hook_is_called(monkeypatch) -> None:
    class Forbidden:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise AssertionError("a recorder was created with tracing off")

    monkeypatch.setattr(engine, "TimelineRecorder", Forbidden)
    model = tiny_model(num_hidden_layers=2)
    async with zoruntime.Runtime(model, zoruntime.ZOSGD(lr=1e-3)) as rt:
        await rt.step(token_batch(model.config))
        assert not rt._instruments
        with pytest.raises(RuntimeError, match=r"tracing is off.*trace=True"):
            rt.timeline  # noqa: B018
    with pytest.raises(AssertionError, match="recorder was created"):
        zoruntime.Runtime(model, zoruntime.ZOSGD(lr=1e-3), trace=True)


def test_each_span_says_when_it_was_issued_and_the_summary_how_far_ahead_the_host_was() -> None:
    """On lanes that run their own tasks (the simulator here), a task is issued once what it
    waits for is done and starts at once: every task started on issue, and a step's issues span
    it (3 blocks, u = c = o = 1: from 0 to the head and last offload at 4)."""
    timeline = simulate(3, 1.0, 1.0, 1.0, FixedDepth(1), block_bytes=10**9)
    assert all(s.issued == s.start for s in timeline.spans)
    summary = timeline.summary()
    assert (summary.issue_seconds, summary.issue_to_start_seconds, summary.started_on_issue) == (4.0, 0.0, 1.0)
    assert "host: a step's tasks issued over 4000.000 ms; compute-lane tasks started 0.000 ms after their " \
           "issue (median), 100% within 0.05 ms of it" in summary.render()  # fmt: skip


def test_a_host_that_keeps_ahead_and_one_that_falls_behind_read_differently() -> None:
    """Device times as on CUDA, where the host enqueues ahead: issued 1 s before the upload-bound
    schedule needs each task, the compute lane's tasks start well after issue; a host that issues
    block 2's compute 0.5 s into the gap before it is named as what the compute lane waited for."""
    simulated = simulate(4, 3.0, 1.0, 1.0, FixedDepth(1))
    ahead = [replace(s, issued=s.start - 1.0) for s in simulated.spans]
    summary = Timeline(ahead, simulated.steps).summary()
    assert summary.issue_to_start_seconds == 1.0 and summary.started_on_issue == 0.0
    late = next(s for s in ahead if s.kind == "compute" and s.unit == "block.2")
    previous_end = max(s.end for s in ahead if s.lane == "compute" and s.end <= late.start)
    behind = [replace(s, issued=previous_end + 0.5) if s is late else s for s in ahead]
    gap = next(g for g in Timeline(behind, simulated.steps).summary().largest_gaps if g.task == "compute block.2")
    assert gap.waiting_for == "upload block.2"  # its upload ended in the gap: that comes first
    no_upload = [replace(s, end=previous_end) if s.kind == "upload" and s.unit == "block.2" else s for s in behind]
    gap = next(g for g in Timeline(no_upload, simulated.steps).summary().largest_gaps if g.task == "compute block.2")
    assert gap.waiting_for == "the host (it issued the task 500.000 ms into the gap)"


@pytest.mark.asyncio
@pytest.mark.parametrize("depth", [0, 1, 2])
async def test_a_second_pass_of_one_step_and_phase_is_told_apart_and_a_failed_one_marked(depth: int, tmp_path) -> None:
    """Two evaluations in a row, and a step retried after a failed head: the same step and phase
    twice. Each pass is its own attempt, a failed one's spans are abandoned, and the summary's
    step window is the retry's alone (it took in the failed attempt and the wait before the
    retry: 92 ms against 9 for a clean step); the timeline's checks hold (they failed)."""
    from zoruntime.runtime.scheduler import TaskFailed
    from zoruntime.testing import inject_faults

    model = tiny_model(num_hidden_layers=4)
    async with zoruntime.Runtime(model, zoruntime.ZOSGD(lr=1e-3), policy=FixedDepth(depth), trace=True) as rt:
        batch = token_batch(model.config)
        for _ in range(2):
            await rt.step(batch)
        first, second = await rt.evaluate(batch), await rt.evaluate(batch)
        assert first == second
        injected = inject_faults(rt, lambda step, task: step == 2 and task.kind.value == "head" and not injected)
        with pytest.raises(TaskFailed, match="fault injected into head of step 2"):
            await rt.step(batch)
        await asyncio.sleep(0.2)  # the caller's wait before it retries: in no step's window
        await rt.step(batch)
        await rt.step(batch)
    timeline = rt.timeline
    check_timeline(timeline)
    evals = [m for m in timeline.steps if m.phase == "eval"]
    assert [(m.step, m.attempt) for m in evals] == [(2, 0), (2, 1)]
    assert {s.attempt for s in timeline.for_step(2, "eval")} == {1}
    failed = [s for s in timeline.spans if s.abandoned]
    assert failed and {(s.step, s.phase, s.attempt) for s in failed} == {(2, "step", 0)}
    assert not any(s.kind == "head" for s in failed)  # the head raised: it has no span
    retried = timeline.for_step(2)
    assert {s.attempt for s in retried} == {1} and any(s.kind == "head" for s in retried)
    assert [(m.step, m.attempt) for m in timeline.steps if m.phase == "step"] == [(0, 0), (1, 0), (2, 1), (3, 0)]
    assert timeline.summary().steps == 4
    step_two = Timeline([s for s in timeline.spans if s.step == 2], [m for m in timeline.steps if m.step == 2])
    retry = max(s.end for s in retried) - min(s.start for s in retried)  # the failed attempt ended 0.2 s before
    assert step_two.summary().step_seconds == pytest.approx(retry)
    loaded = Timeline.load(timeline.save_chrome_trace(tmp_path / "trace.json"))
    who = lambda spans: [(s.step, s.phase, s.index, s.attempt, s.abandoned) for s in spans]  # noqa: E731
    assert who(loaded.spans) == who(timeline.spans)
    assert [(m.step, m.phase, m.attempt) for m in loaded.steps] == [
        (m.step, m.phase, m.attempt) for m in timeline.steps
    ]
