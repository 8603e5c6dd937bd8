"""The GPU suite's machinery, on the CPU: parts run in order under their limits, a part that fails
or hangs does not stop the next, results.json and the summary say what happened; and the
whole suite runs end to end in its CPU smoke mode."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from zoruntime.bench import environment
from zoruntime.bench.gpu_suite import Part, default_parts, render_summary, run_suite
from zoruntime.planning.profiles import load_profile


def _python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def test_a_failing_or_hanging_part_does_not_stop_the_next(tmp_path: Path) -> None:
    parts = [
        Part("fails", _python("import sys; print('boom: ValueError: bad'); sys.exit(3)"), 30),
        Part("hangs", _python("import time; print('started', flush=True); time.sleep(60)"), 1.5),
        Part("works", _python('print("a table"); print(\'{"answer": 42}\')'), 30),
    ]
    started = time.perf_counter()
    results = run_suite(parts, tmp_path, budget_s=60, echo=False)
    assert time.perf_counter() - started < 20  # the hanging part was killed at its limit
    assert [(r.name, r.status) for r in results] == [("fails", "failed"), ("hangs", "timeout"), ("works", "ok")]
    assert results[0].returncode == 3 and "ValueError: bad" in results[0].note
    assert results[1].returncode is None and "limit of 2 s" in results[1].note
    assert results[2].result == {"answer": 42}
    assert "started" in Path(results[1].log).read_text()  # output up to the kill is kept
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["status"] for r in saved] == ["failed", "timeout", "ok"]
    table = render_summary(results)
    assert "fails" in table and "timeout" in table and "exit code 3" in table


def test_parts_beyond_the_budget_are_recorded_as_not_run(tmp_path: Path) -> None:
    parts = [
        Part("slow", _python("import time; time.sleep(60)"), 60),
        Part("never", _python("print('{}')"), 60),
    ]
    results = run_suite(parts, tmp_path, budget_s=1.5, echo=False)
    assert [r.status for r in results] == ["timeout", "not run"]
    assert "budget" in results[1].note


def test_environment_report_has_versions_and_no_gpu_here() -> None:
    facts = environment.describe()
    assert facts["python"] == sys.version.split()[0]
    assert facts["torch"] and facts["transformers"] and facts["cpu_cores"] >= 1
    if facts["gpu"] is not None:  # on a GPU machine: the fields the README table needs
        assert {"name", "memory_gib", "driver", "pcie_gen_current", "pcie_width_current"} <= facts["gpu"].keys()


def test_the_suite_runs_end_to_end_in_cpu_smoke_mode(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "zoruntime.bench.gpu_suite", "--out", str(tmp_path), "--device", "cpu",
         "--models", "tiny,tiny-llama:linear", "--seq", "32", "--trace", "tiny", "--skip", "pytest",
         "--directions", "2", "--planned", "tiny=0.1"],
        capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    results = {r["name"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    assert list(results) == ["env", "tiny", "tiny-llama:linear"] and all(r["status"] == "ok" for r in results.values())
    linear = [row["runner"] for row in results["tiny-llama:linear"]["result"]["rows"]]
    assert "FixedDepth(1, unit='linear')" in linear
    cut = results["tiny-llama:linear"]["result"]["card"]  # the host's time for the block's five linear units
    assert cut["units_per_block"] == 5 and cut["unit"] == "linear" and cut["unit_tasks_enqueue_ms"] > 0
    bench = results["tiny"]["result"]
    runners = [row["runner"] for row in bench["rows"]]
    assert runners[:5] == ["MeZO (after the paper)", "zoruntime, all resident", "FixedDepth(0)", "FixedDepth(1)",
                           "FixedDepth(2)"]  # fmt: skip
    assert runners[-1] == "FixedDepth(1), q=2 two-sided" and bench["rows"][-1]["directions"] == 2
    assert all(row["tokens_s"] > 0 and len(row["step_times_s"]) == 1 for row in bench["rows"])
    assert (tmp_path / "trace_tiny.png").stat().st_size > 0 and bench["trace"]["steps"] == 3
    assert 0 < bench["trace"]["lane_busy"]["compute"] <= 1.0
    assert (tmp_path / "logs" / "tiny.log").exists()
    summary = done.stdout[done.stdout.index("zoruntime GPU suite:") :]  # the table printed at the end
    assert "tokens/s" in summary and "FixedDepth(1)" in summary and "trace: 3 steps" in summary
    assert 0 <= bench["trace"]["started_on_issue"] <= 1 and "host: a step issued over" in summary
    (planned,) = [row for row in bench["rows"] if row["runner"].startswith("planned, 0.1 GB: ")]
    assert planned["predicted_step_s"] > 0 and planned["predicted_gpu_mb"] > 0 and planned["tokens_s"] > 0
    assert f"predicted {planned['predicted_step_s']:.3f} s" in summary
    assert "host: a task" in summary and "to issue (" in summary  # the host's figures beside the card's
    assert "host: the block as 5 linear units' tasks" in summary
    profile = load_profile(str(tmp_path / "profile_tiny-llama_linear.json"))  # zoruntime plan --gpu takes it
    assert profile.host_cut_ms == {"linear": cut["unit_tasks_enqueue_ms"]}
    assert load_profile(str(tmp_path / "profile_tiny.json")).host_cut_ms == {}
    assert "host, each part alone (ms): update" in summary
    parts = default_parts(tmp_path, device="cuda", models=("opt-1.3b", "opt-175b:linear"), seq=2048,
                          planned={"opt-175b:linear": (8.0, 7.5)})  # fmt: skip
    on_a_gpu = {part.name: part.argv for part in parts}
    assert "--cuda-graphs" in on_a_gpu["opt-1.3b"] and "--cuda-graphs" not in on_a_gpu["opt-175b:linear"]
    assert on_a_gpu["opt-175b:linear"][-3:] == ("--planned", "8", "7.5") and "--planned" not in on_a_gpu["opt-1.3b"]


def test_unknown_part_names_are_refused(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "zoruntime.bench.gpu_suite", "--out", str(tmp_path / "out"), "--skip", "nonsense"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "--skip names no part: nonsense" in done.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written
    done = subprocess.run(
        [sys.executable, "-m", "zoruntime.bench.gpu_suite", "--out", str(tmp_path / "out"), "--planned", "opt-1.3b=a"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "--planned 'opt-1.3b=a': write MODEL=GB[,GB]" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "zoruntime.bench.gpu_suite", "--out", str(tmp_path / "out"), "--planned", "opt-2b=8"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "the model must be one of --models" in done.stderr


def test_the_suite_on_a_machine_without_a_gpu_is_one_line(tmp_path: Path) -> None:
    """Each part failed after its own start-up (about 30 s) and the suite ended with 1."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    done = subprocess.run([sys.executable, "-m", "zoruntime.bench.gpu_suite", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert done.returncode == 2 and done.stderr == (
        "python -m zoruntime.bench.gpu_suite: error: no CUDA GPU is visible here; run it on the machine with the GPU "
        "(or --device cpu: a smoke run)\n"
    )
    assert not (tmp_path / "out").exists()
