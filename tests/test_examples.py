"""Every example runs as a user would run it, and says what it claims."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, *args], cwd=EXAMPLES.parent, capture_output=True, text=True, timeout=110, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _dev_losses(out: str) -> tuple[float, float]:
    lines = {line.split(":")[0].strip(): line.split(":")[1].split()[0] for line in out.splitlines() if ":" in line}
    return float(lines["dev loss before"]), float(lines["dev loss after"])


@pytest.mark.slow
def test_reference_finetune_example_lowers_the_dev_loss() -> None:
    before, after = _dev_losses(_run("examples/finetune_reference.py", "--steps", "300"))
    assert after < 0.8 * before


@pytest.mark.slow
def test_async_training_loop_example_lowers_the_dev_loss() -> None:
    before, after = _dev_losses(_run("examples/async_training_loop.py", "--steps", "200"))
    assert after < 0.85 * before


def test_custom_policy_example_beats_serial_in_simulation_and_trains() -> None:
    out = _run("examples/custom_policy.py")
    rows = [line for line in out.splitlines() if line.strip().endswith(" ms")]
    assert len({len(row) for row in rows}) == 1  # a column of times, whatever the policies' names
    ms = {row.split()[0]: float(row.split()[-2]) for row in rows}
    assert ms["EndsResident(ends=4,"] < ms["FixedDepth(depth=1,"] < ms["FixedDepth(depth=0,"]
    assert "resident blocks: (0, 3), streaming slots: 2" in out


def test_timeline_example_writes_a_trace_a_picture_and_a_summary(tmp_path) -> None:
    out = _run("examples/timeline.py", "--out", str(tmp_path), "--steps", "2")
    assert (tmp_path / "trace.json").exists() and (tmp_path / "timeline.png").exists()
    assert "overlap efficiency" in out


def test_the_readme_api_snippet_runs_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    import re

    readme = (EXAMPLES.parent / "README.md").read_text()
    code = re.search(r"## The API in one screen\n\n```python\n(.*?)```", readme, re.S)
    assert code is not None
    exec(compile(code.group(1).replace("range(200)", "range(5)"), "README.md", "exec"), {})
    loss = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < loss < 10


def test_llama_like_example_trains_bf16_masters_with_a_frozen_embedding() -> None:
    out = _run("examples/llama_like.py", "--steps", "50")
    before, after = _dev_losses(out)
    assert "LlamaLikeAdapter, stochastic rounding" in out and after < 0.96 * before


def test_your_data_example_lowers_the_candidates_dev_loss() -> None:
    before, after = _dev_losses(_run("examples/finetune_your_data.py", "--steps", "100"))
    assert after < 0.7 * before


def test_custom_task_example_runs_through_zoruntime_train(tmp_path: Path) -> None:
    import json

    out = _run("examples/custom_task.py", str(tmp_path / "run"))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["dev_loss_after"] < summary["dev_loss_before"], out
