"""Watching a run: every step and evaluation in metrics.jsonl (cut back and continued on resume),
curves.png and a table at the end, TensorBoard on request, the dev figure on the progress bar."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from zoruntime.journal import read_journal
from zoruntime.train import main as train_main
from zoruntime.train.data import Evaluation
from zoruntime.train.loop import _dev_postfix, before_from_state
from zoruntime.train.watch import smoothed, summary_table, tensorboard_missing

FAST = ["--no-progress", "--no-trace", "--max-length", "32", "--batch-size", "4", "--eval-every", "3"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_logs_every_step_and_evaluation_and_ends_with_curves_and_a_table(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert train_main([*FAST, "--steps", "7", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    lines = _metrics(run)
    assert [(m["kind"], m["step"]) for m in lines] == [("dev", 0), *[("train", s) for s in (1, 2, 3)], ("dev", 3),
                                                       *[("train", s) for s in (4, 5, 6)], ("dev", 6), ("train", 7),
                                                       ("dev", 7)]  # fmt: skip
    records = read_journal(run / "journal.jsonl")
    train = [m for m in lines if m["kind"] == "train"]
    assert [(m["losses"], m["projected_grads"], m["lr"]) for m in train] == [
        (r.losses, r.projected_grads, r.lr) for r in records
    ]
    summary = json.loads((run / "summary.json").read_text())
    assert lines[0]["loss"] == summary["dev_loss_before"] and lines[-1]["loss"] == summary["dev_loss_after"]
    assert (run / "curves.png").stat().st_size > 10_000
    assert f"dev loss    {summary['dev_loss_before']:>12.4f}{summary['dev_loss_after']:>12.4f}" in out
    assert "7 steps in " in out


def test_a_resumed_run_continues_its_metrics_from_the_checkpoint(tmp_path: Path, capsys) -> None:
    clean, stopped = tmp_path / "clean", tmp_path / "stopped"
    assert train_main([*FAST, "--steps", "6", "--out", str(clean)]) == 0
    assert train_main([*FAST, "--steps", "4", "--checkpoint-every", "2", "--out", str(stopped)]) == 0
    (stopped / "metrics.jsonl").open("a").write('{"kind": "train", "step": 5, "loss"')  # torn by a crash
    capsys.readouterr()
    assert train_main(["--no-progress", "--resume", str(stopped), "--steps", "6"]) == 0
    out = capsys.readouterr().out  # its time and speed are of the 2 steps it trained, not of all 6
    summary = json.loads((stopped / "summary.json").read_text())
    assert f"\n2 steps (resumed at step 4) in {summary['seconds']:.0f} s, " in out and summary["resumed_at"] == 4
    assert f"lower) over 6 steps, this call's 2 in {summary['seconds']:.0f} s; saved " in out
    timeless = lambda run: [{k: v for k, v in m.items() if k != "tokens_per_s"} for m in _metrics(run)]  # noqa: E731
    resumed = timeless(stopped)
    ended = resumed.pop(6)  # the first run ended at step 4 and was evaluated there: that stays in its history
    assert (ended["kind"], ended["step"]) == ("dev", 4)
    assert resumed == timeless(clean)


def test_the_end_table_keeps_a_wide_figure_apart_from_its_neighbours() -> None:
    """A run that diverged ends with a perplexity wider than its column: it stays readable."""
    summary = {"dev_loss_before": 4.9131, "dev_loss_after": 46.9705, "perplexity_before": 136.06,
               "perplexity_after": 2.506196536480302e20, "metric": "accuracy", "accuracy_before": 0.5,
               "accuracy_after": 0.5, "steps": 20, "seconds": 2.0, "tokens_per_s": 5092.0}  # fmt: skip
    assert summary_table(summary).splitlines() == [
        "                  before       after",
        "dev loss          4.9131     46.9705",
        "perplexity        136.06 250619653648030203904.00",
        "accuracy           50.0%       50.0%",
        "20 steps in 2 s, 5,092 tokens/s",
    ]


def test_the_end_table_of_a_call_that_trained_no_step_says_so() -> None:
    """A resume that only finished the run said "0 steps (resumed at step 4) in 0 s, 8,806
    tokens/s": a speed for no steps. It gives the steps before's speed as theirs, or none."""
    summary = {"dev_loss_before": 5.5639, "dev_loss_after": 5.4485, "perplexity_before": 260.84,
               "perplexity_after": 232.40, "steps": 4, "seconds": 0.1, "tokens_per_s": 8805.5,
               "resumed_at": 4}  # fmt: skip
    last = "no steps left to train (resumed at step 4)"
    assert summary_table(summary).splitlines()[-1] == f"{last}; the steps before ran at 8,806 tokens/s"
    assert summary_table({**summary, "tokens_per_s": 0.0}).splitlines()[-1] == last  # their speed unknown


def test_smoothing_is_an_exponential_moving_average() -> None:
    assert smoothed([4.0, 1.0, 7.0], span=3) == [4.0, 4.0 + 0.5 * (1.0 - 4.0), 2.5 + 0.5 * (7.0 - 2.5)]
    assert smoothed([2.0, 9.0], span=1) == [2.0, 9.0]


def test_the_progress_bar_shows_the_dev_figure_the_task_has() -> None:
    assert _dev_postfix(Evaluation(2.3456)) == {"dev_loss": "2.346"}
    assert _dev_postfix(Evaluation(0.7, ("accuracy", 0.8125))) == {"dev_acc": "81.2%"}
    assert _dev_postfix(Evaluation(0.7, ("exact match", 0.43216))) == {"dev_exact_match": "0.4322"}


def test_a_checkpoint_keeps_the_first_evaluation_with_its_metrics_name() -> None:
    named = {"before_loss": 2.0, "before_metric": ["exact match", 0.25], "next_batch": 3}  # as JSON keeps it
    assert before_from_state(named) == Evaluation(2.0, ("exact match", 0.25))
    assert before_from_state({"before_loss": 2.0, "before_metric": None}) == Evaluation(2.0)
    older = {"before_loss": 2.0, "before_accuracy": 0.5, "next_batch": 3}  # written before names were kept
    assert before_from_state(older) == Evaluation(2.0, ("accuracy", 0.5))
    assert before_from_state({"before_loss": 2.0, "before_accuracy": None}) == Evaluation(2.0)


def test_tensorboard_gets_the_same_figures_when_asked_for(tmp_path: Path, capsys) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert train_main([*FAST, "--steps", "4", "--log", "tensorboard", "--out", str(tmp_path / "tb")]) == 0
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    logged = [(e.step, round(e.value, 4)) for e in events.Scalars("train/loss")]
    expected = [(m["step"], round(m["loss"], 4)) for m in _metrics(tmp_path / "tb") if m["kind"] == "train"]
    assert logged == expected and len(logged) == 4
    assert {"dev/loss", "dev/perplexity", "train/loss", "train/lr"} <= set(events.Tags()["scalars"])


def test_tensorboard_missing_is_one_line_before_anything_is_written(tmp_path: Path, capsys, monkeypatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    assert tensorboard_missing() is not None
    assert train_main([*FAST, "--steps", "2", "--log", "tensorboard", "--out", str(tmp_path / "tb")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'zoruntime[tensorboard]'" in err
    assert not (tmp_path / "tb").exists()


@pytest.mark.parametrize("bad", ["wandb"])
def test_an_unknown_log_is_refused(bad: str, capsys) -> None:
    with pytest.raises(SystemExit):
        train_main(["--log", bad])
    assert "invalid choice: 'wandb'" in capsys.readouterr().err
