"""A timeline as a picture: lanes as rows over time, one colour per task kind, step boundaries
as vertical lines. Headless (matplotlib's Agg canvas, no pyplot and no global state)."""

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


def save_png(timeline: Timeline, path: str | Path, size: tuple[int, int] = (1600, 480)) -> Path:
    """Draw ``timeline`` into a PNG of exactly ``size`` pixels (width, height)."""
    width, height = size
    if width < 200 or height < 120:
        raise ValueError(f"a timeline picture needs at least 200 x 120 pixels, got {width} x {height}")
    dpi = 100
    figure = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
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
    for mark in timeline.steps:
        for edge in (mark.start, mark.end):
            axes.axvline((edge - origin) * unit, color="black", linewidth=0.6, linestyle="--")
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
    steps = len({s.step for s in timeline.spans if s.phase == "step"})
    others = sorted({s.phase for s in timeline.spans} - {"step"})
    extra = f" (+ {', '.join(others)})" if others else ""
    axes.set_title(f"{steps} training step(s){extra}, {len(timeline.spans)} tasks; dashed: boundaries", loc="left")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path
