"""A timeline as a picture: lanes as rows over time, one colour per task kind, each step's start
as a labelled vertical line; the title says which steps it shows. Headless (matplotlib's Agg
canvas, no pyplot and no global state)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .recorder import Timeline

COLOURS = {
    "upload": "#4C72B0",
    "compute": "#55A868",
    "offload": "#C44E52",
    "embed": "#8172B2",
    "head": "#CCB974",
    "update": "#64B5CD",
    "eval": "#8C8C8C",
}
LANE_ORDER = ("upload", "compute", "offload")


def save_png(
    timeline: Timeline, path: str | Path, size: tuple[int, int] = (1600, 480), recorded: int | None = None
) -> Path:
    """Draw ``timeline`` into a PNG of exactly ``size`` pixels (width, height); ``recorded``: how
    many training steps the whole trace holds, when ``timeline`` is a window of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    draw(timeline, size, recorded).savefig(path, dpi=DPI)
    return path


DPI = 100


def draw(timeline: Timeline, size: tuple[int, int] = (1600, 480), recorded: int | None = None) -> Figure:
    """The figure ``save_png`` writes."""
    width, height = size
    if width < 200 or height < 120:
        raise ValueError(f"a timeline picture needs at least 200 x 120 pixels, got {width} x {height}")
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    lanes = [lane for lane in LANE_ORDER if any(s.lane == lane for s in timeline.spans)]
    lanes += sorted({s.lane for s in timeline.spans} - set(lanes))
    origin = min([s.start for s in timeline.spans] + [m.start for m in timeline.steps], default=0.0)
    unit, label = (1e3, "ms") if timeline.makespan < 10 else (1.0, "s")
    for row, lane in enumerate(lanes):
        spans = [s for s in timeline.spans if s.lane == lane]
        axes.broken_barh(
            [((s.start - origin) * unit, max(s.duration * unit, 1e-9)) for s in spans],
            (row - 0.4, 0.8),
            facecolors=[COLOURS.get(s.kind, "#999999") for s in spans],
            edgecolors="white",
            linewidth=0.3,
        )
    marks = sorted(timeline.steps, key=lambda m: m.start)
    for i, mark in enumerate(marks):  # a step's start; the last one's end too (steps overlap: ends would crowd)
        edges = (mark.start, mark.end) if i == len(marks) - 1 else (mark.start,)
        for edge in edges:
            axes.axvline((edge - origin) * unit, color="black", linewidth=0.6, linestyle="--")
        at_top = mark.phase != "step"  # flush, eval, load: above, apart from the steps' labels
        axes.annotate(mark.name, ((mark.start - origin) * unit, 1 if at_top else 0), xycoords=("data", "axes fraction"),
                      xytext=(2, -9 if at_top else 2), textcoords="offset points", fontsize=8)  # fmt: skip
    axes.set_yticks(range(len(lanes)), lanes)
    axes.set_ylim(len(lanes) - 0.5, -0.5)
    axes.set_xlabel(f"time ({label})")
    kinds = [k for k in COLOURS if any(s.kind == k for s in timeline.spans)]
    axes.legend(
        handles=[Patch(color=COLOURS[k], label=k) for k in kinds],
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        ncols=len(kinds),
        frameon=False,
    )
    steps = sorted({s.step for s in timeline.spans if s.phase == "step"})
    others = sorted({s.phase for s in timeline.spans} - {"step"})
    extra = f" (+ {', '.join(others)})" if others else ""
    which = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}" if steps else "no steps"
    of = f" of the {recorded} recorded" if recorded is not None and recorded != len(steps) else ""
    axes.set_title(f"{which}{of}{extra}, {len(timeline.spans)} tasks; dashed: where each step starts", loc="left")
    figure.tight_layout()
    return figure
