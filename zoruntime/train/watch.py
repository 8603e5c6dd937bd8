"""What a run shows while it trains and when it ends: every step's and every evaluation's figures
in ``metrics.jsonl`` (always), in TensorBoard too with ``--log tensorboard``; ``curves.png`` and a
short table at the end.

A line of ``metrics.jsonl`` is ``{"kind": "train", "step": N, ...}`` after N steps (both
perturbed losses, their mean, the projected gradient, lr, tokens/s, steps skipped so far) or
``{"kind": "dev", "step": N, "loss": ..., "perplexity": ...}``, with the task's metric under its
key and its name as ``"metric"`` (``{..., "accuracy": 0.8, "metric": "accuracy"}``). A resumed run
keeps the lines up to its checkpoint and writes the rest again.

Knows the figures a step and an evaluation give and where they go; nothing of the model, the
data or the loop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

from ..data.tasks import metric_key, show_metric
from ..zo.stats import StepStats

METRICS = "metrics.jsonl"


def tensorboard_missing() -> str | None:
    """Why ``--log tensorboard`` cannot work here, or None when it can."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return "--log tensorboard needs TensorBoard: pip install 'zoruntime[tensorboard]' (or pip install tensorboard)"
    return None


class MetricsLog:
    """Appends to ``folder/metrics.jsonl`` (cut back to ``resumed_at`` steps) and, with
    ``tensorboard``, writes the same figures under ``folder/tensorboard``."""

    def __init__(self, folder: Path, tensorboard: bool = False, resumed_at: int = 0) -> None:
        path = folder / METRICS
        kept = [line for line in _lines(path) if line["step"] <= resumed_at] if resumed_at else []
        path.write_text("".join(json.dumps(line) + "\n" for line in kept))
        self.path = path
        self._evaluated = {line["step"] for line in kept if line["kind"] == "dev"}
        self.resumed_tokens_per_s: float | None = next(  # the last step's before the resume (None: none)
            (line["tokens_per_s"] for line in reversed(kept) if line["kind"] == "train"), None
        )
        self.skipped_steps = max((line["skipped_steps"] for line in kept if line["kind"] == "train"), default=0)
        self._file: IO[str] | None = path.open("a")
        self._writer: Any = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(folder / "tensorboard"), purge_step=resumed_at + 1 if resumed_at else None)

    def train(self, done: int, stats: StepStats, tokens_per_s: float) -> None:
        """Step ``done`` (counted from 1); ``skipped_steps`` counts the run's, from its start."""
        self.skipped_steps += stats.skipped
        self._write({"kind": "train", "step": done, "loss": stats.loss, "losses": list(stats.losses),
                     "projected_grads": list(stats.projected_grads), "lr": stats.lr, "tokens_per_s": tokens_per_s,
                     "skipped_steps": self.skipped_steps})  # fmt: skip

    def dev(self, done: int, loss: float, perplexity: float, metric: tuple[str, float] | None) -> None:
        """An evaluation after ``done`` steps; ``metric``: the task's, its name and value (or None).
        One a step: a resumed run that evaluates a step again (its end, where the run stopped
        while writing its outputs) writes it once."""
        if done in self._evaluated:
            return
        self._evaluated.add(done)
        line: dict[str, Any] = {"kind": "dev", "step": done, "loss": loss, "perplexity": perplexity}
        if metric is not None:
            name, value = metric
            line.update({metric_key(name): value, "metric": name})
        self._write(line)

    def _write(self, line: dict[str, Any]) -> None:
        assert self._file is not None, "the metrics log is closed"
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        if self._writer is not None:
            for name, value in line.items():
                if name not in ("kind", "step") and isinstance(value, int | float):  # not the lists
                    self._writer.add_scalar(f"{line['kind']}/{name}", value, line["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _lines(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a metrics file (a torn last line from a crash is left out)."""
    if not path.is_file():
        return []
    found = []
    for text in path.read_text().splitlines():
        try:
            found.append(json.loads(text))
        except json.JSONDecodeError:
            break
    return found


def smoothed(values: list[float], span: int) -> list[float]:
    """An exponential moving average with weight ``2 / (span + 1)`` on each new value."""
    alpha, out = 2.0 / (span + 1), list[float]()
    for value in values:
        out.append(value if not out else out[-1] + alpha * (value - out[-1]))
    return out


def save_curves(folder: Path, png: Path) -> Path:
    """``curves.png`` from ``folder/metrics.jsonl``: the train loss (raw, faint, and smoothed over
    about a twentieth of the run) and the dev loss by step; the task's dev metric beside it when
    it has one."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines = _lines(folder / METRICS)
    train = [line for line in lines if line["kind"] == "train"]
    dev = [line for line in lines if line["kind"] == "dev"]
    # the metric's name; a line written before names were kept has an accuracy alone
    scored = [line for line in dev if metric_key(line.get("metric", "accuracy")) in line]
    name = scored[-1].get("metric", "accuracy") if scored else None
    figure = Figure(figsize=(12 if scored else 7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 2 if scored else 1, 1)
    steps, losses = [line["step"] for line in train], [line["loss"] for line in train]
    span = max(1, len(train) // 20)
    (raw,) = axes.plot(steps, losses, color="#4C72B0", linewidth=0.8, label="train loss (mean of L+ and L-)")
    raw.set_alpha(0.25)  # faint: the smoothed line is the one to read
    axes.plot(steps, smoothed(losses, span), color="#4C72B0", label=f"train loss, smoothed over ~{span} steps")
    axes.plot([line["step"] for line in dev], [line["loss"] for line in dev], "o-", color="#C44E52", label="dev loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(f"{len(train)} steps", loc="left")
    axes.legend(frameon=False)
    if scored and name is not None:
        right = figure.add_subplot(1, 2, 2)
        key = metric_key(name)
        right.plot([line["step"] for line in scored], [line[key] for line in scored], "o-", color="#55A868")
        right.set_xlabel("step")
        right.set_ylabel(f"dev {name}")
    figure.tight_layout()
    figure.savefig(png)
    return png


def summary_table(summary: dict[str, Any]) -> str:
    """The end of a run in a few aligned lines: dev figures before and after (from the run's
    start), the steps this call trained and their speed (a call that only finished the run: the
    speed of the steps before). A space separates the columns, so a figure too wide for its
    column (the perplexity of a run that diverged) pushes the line on rather than run into its
    neighbour."""
    row = lambda name, before, after: f"{name:<11}  {before:>11} {after:>11}"  # noqa: E731
    lines = [row("", "before", "after")]
    for name, key, form in [("dev loss", "dev_loss", "{:.4f}".format), ("perplexity", "perplexity", "{:.2f}".format)]:
        lines.append(row(name, form(summary[key + "_before"]), form(summary[key + "_after"])))
    metric = summary.get("metric")
    if metric is not None:
        before, after = (show_metric(metric, summary[f"{metric_key(metric)}_{when}"]) for when in ("before", "after"))
        lines.append(row(metric, before, after))
    skipped = f" ({summary['skipped_steps']} skipped)" if summary.get("skipped_steps") else ""
    if (summary.get("directions") or 1) > 1:
        skipped += f" of {summary['directions']} directions"
    resumed_at = summary.get("resumed_at") or 0  # the seconds and tokens/s are this call's: its steps only
    if summary["steps"] == resumed_at:  # a resume that only finished the run: tokens/s are the steps before's
        rate = summary["tokens_per_s"]
        before = f"; the steps before ran at {rate:,.0f} tokens/s" if rate else ""
        lines.append(f"no steps left to train (resumed at step {resumed_at}){before}")
        return "\n".join(lines)
    steps = f"{summary['steps'] - resumed_at} steps" + (f" (resumed at step {resumed_at})" if resumed_at else "")
    lines.append(f"{steps}{skipped} in {summary['seconds']:.0f} s, {summary['tokens_per_s']:,.0f} tokens/s")
    return "\n".join(lines)
