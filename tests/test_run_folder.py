"""A run folder is never damaged: a second run is refused, resume never destroys, replay needs
only the run, bad input and Ctrl-C are one line, a diverging run stops (``zoruntime train``
called in-process, except where a signal or a second process is the point)."""

from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zoruntime.data.tokenizer import ByteTokenizer
from zoruntime.journal import read_journal
from zoruntime.models import random_opt, tiny_opt_config
from zoruntime.replay import main as replay_main
from zoruntime.runs import RunLock
from zoruntime.train import main as train_main
from zoruntime.zo import DIRECTION_SCHEME

FAST = ["--no-progress", "--eval-every", "0", "--no-trace", "--max-length", "32", "--batch-size", "4"]


def train(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = train_main([*FAST, *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (the lock file aside) with a hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def same_weights(a: Path, b: Path) -> bool:
    x, y = weights(a), weights(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 6-step run with a checkpoint every 2 steps (kept: steps 4 and 6)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train_main([*FAST, "--steps", "6", "--checkpoint-every", "2", "--out", str(out)]) == 0
    return out


def test_a_folder_that_holds_a_run_is_refused_and_left_as_it_was(finished_run: Path, capsys) -> None:
    before = snapshot(finished_run)
    code, _, err = train(capsys, "--steps", "3", "--out", str(finished_run))
    assert code == 2 and err.count("\n") == 1
    assert f"{finished_run} already holds a run (finished, 6 steps): --resume {finished_run} to continue" in err
    assert "--overwrite to start again" in err
    assert snapshot(finished_run) == before


def test_overwrite_starts_again_and_removes_only_the_old_runs_files(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert train(capsys, "--steps", "4", "--checkpoint-every", "2", "--out", str(out))[0] == 0
    (out / "notes.txt").write_text("mine")
    code, _, _ = train(capsys, "--steps", "2", "--seed", "1", "--overwrite", "--out", str(out))
    assert code == 0
    assert [r.step for r in read_journal(out / "journal.jsonl")] == [0, 1]
    assert [p.name for p in sorted((out / "checkpoints").glob("checkpoint-*"))] == ["checkpoint-00000002"]
    assert json.loads((out / "zoruntime.json").read_text())["seed"] == 1
    assert (out / "notes.txt").read_text() == "mine"


def test_a_folder_in_use_is_refused_naming_the_other_process(finished_run: Path, tmp_path: Path, capsys) -> None:
    with RunLock(finished_run, "zoruntime train, rank 0"):
        code, _, err = train(capsys, "--resume", str(finished_run), "--steps", "8")
        assert code == 2 and f"is in use by process {os.getpid()} (zoruntime train, rank 0)" in err
        assert replay_main(["--run", str(finished_run), "--out", str(tmp_path / "replayed")]) == 2
        assert "is in use by process" in capsys.readouterr().err
    assert not (tmp_path / "replayed").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--policy", "memory=0"], "--policy memory=0: memory budget of 0 bytes is too small"),
        (["--policy", "depth=1000"], "the model has 4 blocks, so at most 3 uploads can run ahead"),
        (["--batch-size", "100000", "--max-length", "64"], "--batch-size 100000 x --max-length 64 needs about"),
        (["--device", "cuda:7"], "--device cuda:7"),
        (["--device", "tpu"], "--device 'tpu' is not auto, cpu, cuda or cuda:N"),
        (["--text-file", "."], "--text-file . is a folder; give a text file"),
        (["--stop-after-nonfinite", "0"], "--stop-after-nonfinite must be > 0"),
        (["--overwrite", "--resume", "x"], "give one of them"),
    ],
)
def test_bad_options_are_one_line_and_nothing_is_written(args, message, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code, _, err = train(capsys, "--steps", "2", *args, "--out", str(out))
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not out.exists()


def test_an_out_that_is_a_file_or_under_one_is_one_line(tmp_path: Path, capsys) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    assert "is a file, not a folder" in train(capsys, "--out", str(file))[2]
    code, _, err = train(capsys, "--out", str(file / "run"))
    assert code == 2 and f"cannot be created: {file} is a file" in err


def test_resume_never_throws_steps_away(finished_run: Path, capsys) -> None:
    before = snapshot(finished_run)
    code, _, err = train(capsys, "--resume", str(finished_run), "--steps", "3")
    assert code == 2 and "--steps 3 is below the run's last checkpoint (step 6)" in err
    code, out, _ = train(capsys, "--resume", str(finished_run))
    assert code == 0 and "the run already finished its 6 steps; nothing to do" in out
    assert snapshot(finished_run) == before


def test_the_last_step_is_checkpointed_and_the_two_newest_are_kept(finished_run: Path, tmp_path: Path, capsys):
    names = sorted(p.name for p in (finished_run / "checkpoints").glob("checkpoint-*"))
    assert names == ["checkpoint-00000004", "checkpoint-00000006"]
    out = tmp_path / "run"
    assert train(capsys, "--steps", "3", "--checkpoint-every", "0", "--out", str(out))[0] == 0
    assert [p.name for p in (out / "checkpoints").glob("checkpoint-*")] == ["checkpoint-00000003"]


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path: Path, capsys) -> None:
    clean, damaged = tmp_path / "clean", tmp_path / "damaged"
    assert train(capsys, "--steps", "8", "--checkpoint-every", "2", "--out", str(clean))[0] == 0
    assert train(capsys, "--steps", "6", "--checkpoint-every", "2", "--out", str(damaged))[0] == 0
    newest = damaged / "checkpoints" / "checkpoint-00000006" / "weights.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    code, out, _ = train(capsys, "--resume", str(damaged), "--steps", "8")
    assert code == 0
    assert f"passed over a damaged checkpoint: {newest.parent}" in out and "resumed at step 4" in out
    assert same_weights(clean / "model", damaged / "model")
    assert read_journal(clean / "journal.jsonl") == read_journal(damaged / "journal.jsonl")


def test_a_damaged_journal_or_only_checkpoint_is_one_line(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert train(capsys, "--steps", "4", "--checkpoint-every", "0", "--out", str(out))[0] == 0
    (out / "summary.json").unlink()
    journal = out / "journal.jsonl"
    lines = journal.read_text().split("\n")
    journal.write_text("\n".join([*lines[:2], "damaged", *lines[3:]]))
    code, _, err = train(capsys, "--resume", str(out))
    assert code == 2 and err.count("\n") == 1 and f"{journal}, line 3: damaged record" in err
    only = out / "checkpoints" / "checkpoint-00000004" / "weights.safetensors"
    only.write_bytes(b"")
    code, _, err = train(capsys, "--resume", str(out))
    assert code == 2 and err.count("\n") == 1 and "no readable checkpoint" in err and str(only.parent) in err


def test_replay_needs_only_the_run_and_refuses_another_base(finished_run: Path, tmp_path: Path, capsys) -> None:
    assert replay_main(["--run", str(finished_run), "--out", str(tmp_path / "replayed")]) == 0
    assert same_weights(finished_run / "model", tmp_path / "replayed")
    assert (finished_run / "base" / "config.json").exists()  # the built-in base was kept
    header = json.loads((finished_run / "journal.jsonl").read_text().split("\n")[0])
    assert header["base"] == "built-in" and len(header["base_fingerprint"]) == 32
    code = replay_main(["--base", str(finished_run / "model"), "--journal", str(finished_run / "journal.jsonl"),
                        "--out", str(tmp_path / "wrong")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "is not the model this run started from" in err


def test_a_run_of_another_direction_scheme_is_refused_in_one_line(finished_run: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns(".lock"))
    state_file = run / "checkpoints" / "checkpoint-00000006" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["direction_scheme"] == DIRECTION_SCHEME
    state_file.write_text(json.dumps({**state, "direction_scheme": 1}))
    before = snapshot(run)
    code, _, err = train(capsys, "--resume", str(run), "--steps", "8")
    assert code == 2 and err.count("\n") == 1, err
    refused = f"the checkpoint {state_file.parent} was written with direction scheme 1, this zoruntime draws scheme 2"
    assert refused in err
    assert snapshot(run) == before  # not passed over for checkpoint-00000004, nothing cut or written
    state_file.write_text(json.dumps(state))
    journal = run / "journal.jsonl"
    header, *records = journal.read_text().split("\n")
    assert json.loads(header)["direction_scheme"] == DIRECTION_SCHEME
    journal.write_text("\n".join([json.dumps({**json.loads(header), "direction_scheme": 1}), *records]))
    before = snapshot(run)
    code, _, err = train(capsys, "--resume", str(run), "--steps", "8")
    refused = f"journal {journal} was written with direction scheme 1, this zoruntime draws scheme 2"
    assert code == 2 and err.count("\n") == 1 and refused in err, err
    code = replay_main(["--run", str(run), "--out", str(tmp_path / "replayed")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and refused in err, err
    assert "with the zoruntime version that wrote it" in err and not (tmp_path / "replayed").exists()
    assert snapshot(run) == before


def test_a_diverging_run_stops_with_one_line_and_saves_no_model(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code, _, err = train(capsys, "--lr", "1e10", "--steps", "50", "--stop-after-nonfinite", "3", "--out", str(out))
    assert code == 2 and err.count("\n") == 1
    assert "the last 3 steps had a non-finite loss (the run diverged); lower --lr (it is 1e+10)" in err
    assert "checkpoints" not in err  # none was due yet: none is pointed at
    assert not (out / "model").exists() and not (out / "summary.json").exists()
    assert len(read_journal(out / "journal.jsonl")) < 50


def test_a_non_finite_dev_loss_stops_with_one_line(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code, _, err = train(capsys, "--lr", "1e10", "--steps", "6", "--eval-every", "2", "--stop-after-nonfinite", "100",
                         "--out", str(out))  # fmt: skip
    assert code == 2 and err.count("\n") == 1
    assert "the dev loss after step 2 is not finite (the run diverged); lower --lr" in err
    assert not (out / "model").exists() and len(read_journal(out / "journal.jsonl")) == 2


def test_no_progress_means_no_progress_bars_and_the_help_says_so(tmp_path: Path, capsys) -> None:
    code, _, err = train(capsys, "--steps", "2", "--out", str(tmp_path / "run"))
    assert code == 0 and "it/s" not in err and "Writing" not in err
    with pytest.raises(SystemExit):
        train_main(["--help"])
    help_text = capsys.readouterr().out
    assert "--progress, --no-progress" in help_text and "show a progress bar (default: True)" in help_text


def test_an_unreachable_hub_is_one_line_at_once(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_ENDPOINT"] = "https://127.0.0.1:9"  # nothing answers there
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "zoruntime", "train", "--model", "facebook/opt-125m", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=120, env=env, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "the Hugging Face hub cannot be reached" in done.stderr and "huggingface-cli download" in done.stderr
    assert time.perf_counter() - started < 30  # no retries: import time, then one connection attempt


def _journal_lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


def test_ctrl_c_checkpoints_the_last_step_and_resume_ends_where_a_clean_run_does(tmp_path: Path, capsys) -> None:
    clean, stopped = tmp_path / "clean", tmp_path / "stopped"
    assert train(capsys, "--steps", "120", "--checkpoint-every", "1000", "--out", str(clean))[0] == 0
    command = [sys.executable, "-m", "zoruntime", "train", *FAST, "--steps", "120", "--checkpoint-every", "1000",
               "--out", str(stopped)]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while _journal_lines(stopped / "journal.jsonl") < 15 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err.count("\n") == 1 and f"checkpointed; continue with zoruntime train --resume {stopped}" in err
    records = read_journal(stopped / "journal.jsonl")
    assert 14 <= len(records) < 120
    checkpoint = stopped / "checkpoints" / f"checkpoint-{len(records):08d}"
    assert checkpoint.is_dir()  # the last completed step, nothing lost
    assert train(capsys, "--resume", str(stopped))[0] == 0
    assert same_weights(clean / "model", stopped / "model")
    assert read_journal(clean / "journal.jsonl") == read_journal(stopped / "journal.jsonl")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _without_rates(lines: list[dict]) -> list[dict]:
    return [{k: v for k, v in line.items() if k != "tokens_per_s"} for line in lines]


def _ctrl_c_when(monkeypatch: pytest.MonkeyPatch, target: object, name: str, when=lambda *args: True) -> None:
    """Send this process SIGINT (as Ctrl-C does) inside ``target.name`` when ``when(*its args)``."""
    original = getattr(target, name)

    def wrapped(*args, **kwargs):
        if when(*args):
            os.kill(os.getpid(), signal.SIGINT)
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapped)


def test_ctrl_c_on_an_evaluation_step_evaluates_it_before_stopping(tmp_path: Path, capsys, monkeypatch) -> None:
    """The resumed run starts after that step, so an evaluation left for after the interrupt would
    never be made: the interrupted run's metrics, resumed, equal a clean run's."""
    from zoruntime.train.watch import MetricsLog

    args = ["--steps", "6", "--eval-every", "2", "--checkpoint-every", "100"]
    assert train(capsys, *args, "--out", str(tmp_path / "clean"))[0] == 0
    with monkeypatch.context() as patched:
        _ctrl_c_when(patched, MetricsLog, "train", lambda log, done, *rest: done == 4)
        code, _, err = train(capsys, *args, "--out", str(tmp_path / "stopped"))
    assert code == 130 and "interrupted at step 4: checkpointed" in err
    assert {"kind": "dev", "step": 4}.items() <= _metrics(tmp_path / "stopped")[-1].items()
    assert train(capsys, "--resume", str(tmp_path / "stopped"))[0] == 0
    assert _without_rates(_metrics(tmp_path / "stopped")) == _without_rates(_metrics(tmp_path / "clean"))
    assert same_weights(tmp_path / "clean" / "model", tmp_path / "stopped" / "model")


def test_ctrl_c_while_the_outputs_are_written_lets_them_finish(tmp_path: Path, capsys, monkeypatch) -> None:
    """The run is over: the model, summary and curves are written whole, and it says so (not
    "nothing was trained")."""
    from zoruntime.train import loop

    _ctrl_c_when(monkeypatch, loop, "save_model", lambda model, tokenizer, folder: folder.name == "model")
    code, out, err = train(capsys, "--steps", "3", "--out", str(tmp_path / "run"))
    assert code == 0 and "nothing was trained" not in err
    assert "Ctrl-C came while the outputs were written; they were finished first" in out
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 3
    assert weights(tmp_path / "run" / "model")


def test_a_run_stopped_after_its_last_checkpoint_is_finished_by_resume_without_repeating_itself(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """Ctrl-C during the last checkpoint stops there (one line saying how to finish); resume then
    only evaluates and writes: one dev line for the last step, the run's own tokens/s, and the
    trace of the steps it trained is not replaced by one of an evaluation."""
    from zoruntime import engine

    run = tmp_path / "run"
    with monkeypatch.context() as patched:
        _ctrl_c_when(patched, engine.Runtime, "save_checkpoint", lambda rt, *rest: rt.step_index == 4)
        code, _, err = train(capsys, "--steps", "4", "--eval-every", "2", "--trace", "--out", str(run))
    assert code == 130 and err.count("\n") == 1
    assert f"interrupted after the last step (4): checkpointed; write the model and the summary with " \
           f"zoruntime train --resume {run}" in err  # fmt: skip
    assert not (run / "summary.json").exists() and not (run / "model").exists()
    code, out, _ = train(capsys, "--resume", str(run))
    assert code == 0
    lines = _metrics(run)
    rate = next(line for line in reversed(lines) if line["kind"] == "train")["tokens_per_s"]
    assert f"\nno steps left to train (resumed at step 4); the steps before ran at {rate:,.0f} tokens/s\n" in out
    assert "lower) over 4 steps, all trained before this call; saved " in out and "this call's 0" not in out
    assert [line["step"] for line in lines if line["kind"] == "dev"] == [0, 2, 4]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tokens_per_s"] == next(line for line in reversed(lines) if line["kind"] == "train")["tokens_per_s"]
    trace, written = run / "trace.json", (run / "trace.json").read_bytes() if (run / "trace.json").exists() else None
    (run / "summary.json").unlink()  # as if killed while writing: resume finishes it again
    assert train(capsys, "--resume", str(run))[0] == 0
    assert [line["step"] for line in _metrics(run) if line["kind"] == "dev"] == [0, 2, 4]
    assert (trace.read_bytes() if trace.exists() else None) == written


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dtype", "fp16", "--eps", "1e-10"], "--eps 1e-10 rounds to 0 in torch.float16, so nothing would be "
                                                "perturbed: give a larger --eps"),
        (["--dtype", "fp16", "--compute-dtype", "fp32"], "--compute-dtype fp32 is wider than the weights (--dtype "
                                                         "fp16): give --dtype fp32 to keep fp32 masters"),
        (["--dev", "dev.jsonl"], "--dev goes with --data (or --text-file): the built-in corpus and sst2 bring their "
                                 "own dev"),
        (["--labels", "a:b"], "--labels goes with --task classify, not --task lm"),
        (["--task", "classify", "--data", __file__, "--labels", "neg:bad,pos:bad"], "--labels 'neg:bad,pos:bad': "
                                                                                     "the word 'bad' comes twice"),
        (["--task", "classify", "--data", __file__, "--labels", "neg:bad,neg:good"], "--labels 'neg:bad,neg:good': "
                                                                                      "the label 'neg' comes twice"),
    ],
)  # fmt: skip
def test_options_that_cannot_train_are_one_line_naming_the_flag(tmp_path: Path, capsys, args, message) -> None:
    code, _, err = train(capsys, "--steps", "2", *args, "--out", str(tmp_path / "run"))
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def saved_in_fp16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-block OPT saved in fp16, with its byte-level tokenizer."""
    folder = tmp_path_factory.mktemp("fp16") / "base"
    random_opt(tiny_opt_config(num_hidden_layers=2), seed=0, dtype=torch.float16).save_pretrained(folder)
    ByteTokenizer().save_pretrained(folder)
    return folder


def test_dtype_auto_trains_a_model_in_the_dtype_it_was_saved_in(saved_in_fp16: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    code, _, err = train(capsys, "--model", str(saved_in_fp16), "--steps", "2", "--checkpoint-every", "1",
                         "--out", str(run))  # fmt: skip
    assert code == 0, err
    assert json.loads((run / "zoruntime.json").read_text())["dtype"] == "fp16"
    assert {t.dtype for t in weights(run / "model").values()} == {torch.float16}
    code, _, err = train(capsys, "--resume", str(run), "--steps", "3", "--dtype", "auto")
    assert code == 0, err
    code, _, err = train(capsys, "--resume", str(run), "--steps", "4", "--dtype", "fp32")
    assert code == 2 and "--dtype 'fp32' (the run used 'fp16')" in err, err


def test_dtype_auto_is_fp32_for_the_built_in_model(finished_run: Path) -> None:
    assert json.loads((finished_run / "zoruntime.json").read_text())["dtype"] == "fp32"


def test_a_run_named_by_relative_paths_resumes_and_replays_from_any_folder(
    saved_in_fp16: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """The run records its inputs' absolute paths (it recorded them as typed, so resume and
    replay from another folder looked for 'base' there)."""
    (tmp_path / "work").mkdir()
    shutil.copytree(saved_in_fp16, tmp_path / "work" / "base")
    (tmp_path / "work" / "notes.txt").write_text("the cat sat on the mat. " * 80)
    monkeypatch.chdir(tmp_path / "work")
    code, _, err = train(capsys, "--model", "base", "--text-file", "notes.txt", "--steps", "2",
                         "--checkpoint-every", "1", "--out", "run")  # fmt: skip
    assert code == 0, err
    saved = json.loads(Path("run/zoruntime.json").read_text())
    assert saved["model"] == str(tmp_path / "work" / "base") and saved["text_file"] == str(tmp_path / "work/notes.txt")
    monkeypatch.chdir(tmp_path)
    code, _, err = train(capsys, "--resume", "work/run", "--steps", "3")
    assert code == 0, err
    assert replay_main(["--run", "work/run", "--out", "replayed"]) == 0, capsys.readouterr().err
    assert same_weights(tmp_path / "work" / "run" / "model", tmp_path / "replayed")
    monkeypatch.chdir(tmp_path / "work")  # the same inputs named as at the start: the same run
    code, _, err = train(capsys, "--resume", "run", "--steps", "4", "--model", "base", "--text-file", "notes.txt")
    assert code == 0, err


def test_dtype_auto_is_checked_as_the_dtype_it_takes(saved_in_fp16: Path, tmp_path: Path, capsys) -> None:
    code, _, err = train(capsys, "--model", str(saved_in_fp16), "--compute-dtype", "fp32", "--out", str(tmp_path / "r"))
    assert code == 2 and err.count("\n") == 1, err
    assert "--compute-dtype fp32 is wider than the weights (--dtype fp16): give --dtype fp32 to keep fp32 masters, " \
           "or a narrower --compute-dtype (--dtype auto: fp16, as the model was saved)" in err  # fmt: skip
    assert not (tmp_path / "r").exists()
    code, _, err = train(capsys, "--model", str(tmp_path / "none"), "--out", str(tmp_path / "r"))
    assert code == 2 and f"the folder '{tmp_path / 'none'}' does not exist" in err, err


TASK_OF_BAD_BATCHES = """
import torch
from zoruntime.data.tasks import ExampleTask


def make(config, tokenizer, batch):
    rows = [list(range(10 + i % 5, 30 + i % 5)) for i in range(20)]
    return ExampleTask(rows[:18], rows[18:], batch, config.batch_size, config.seed)


def float_ids(config, tokenizer):
    return make(config, tokenizer, lambda rows: {"input_ids": torch.tensor(rows).float()})


def nothing_scored(config, tokenizer):
    return make(config, tokenizer, lambda rows: {"input_ids": torch.tensor(rows),
                                                 "labels": torch.full((len(rows), 20), -100)})
"""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "{tasks}:float_ids"], "--task {tasks}:float_ids, its training batch 0: input_ids must hold "
                                          "integer token ids (torch.long), got dtype torch.float32; use .long()"),
        (["--task", "{tasks}:nothing_scored"], "--task {tasks}:nothing_scored, its training batch 0: the batch has "
                                               "no token to score: every label after a row's first token is -100 "
                                               "or padding"),
        (["--model", "{model}", "--max-length", "500"], "--max-length 500 is longer than the model's 128 positions; "
                                                        "give --max-length 128 or less"),
    ],
)  # fmt: skip
def test_a_task_whose_batches_the_runtime_refuses_is_one_line_before_anything_is_written(
    tmp_path: Path, capsys, args, message
) -> None:
    tasks, model = tmp_path / "tasks.py", tmp_path / "model"
    tasks.write_text(TASK_OF_BAD_BATCHES)
    if "{model}" in args:  # a saved model, whose 128 positions --max-length cannot stretch
        random_opt(tiny_opt_config(max_position_embeddings=128), seed=0).save_pretrained(model)
        ByteTokenizer().save_pretrained(model)
    args = [arg.format(tasks=tasks, model=model) for arg in args]
    code, _, err = train(capsys, "--steps", "2", *args, "--out", str(tmp_path / "run"))
    assert code == 2 and err.count("\n") == 1 and message.format(tasks=tasks) in err, err
    assert not (tmp_path / "run").exists()  # a plain rerun is not blocked by a half-made folder


def test_inputs_that_raised_a_traceback_are_one_line_and_write_nothing(tmp_path: Path, capsys) -> None:
    """A template with another field, --data naming a folder, a model whose weights file is
    damaged, an --out that cannot be made (/proc refuses what os.access allows)."""
    records = tmp_path / "records.jsonl"
    records.write_text('{"text": "good film", "label": "pos"}\n{"text": "bad film", "label": "neg"}\n' * 10)
    damaged = tmp_path / "damaged"
    random_opt(tiny_opt_config(), seed=0).save_pretrained(damaged)
    ByteTokenizer().save_pretrained(damaged)
    (damaged / "model.safetensors").write_bytes(b"\xff" * 64)
    capsys.readouterr()  # saving it may have drawn transformers' progress bar
    classify = ["--task", "classify", "--data", str(records), "--labels", "neg:bad,pos:good"]
    cases = [
        ([*classify, "--template", "{text} {oops}"], "--template '{text} {oops}': only {text} may stand in braces"),
        ([*classify, "--template", "{0} {text}"], "--template '{0} {text}': only {text} may stand in braces"),
        (["--task", "lm", "--data", str(tmp_path)], f"--data {tmp_path} is a folder; give a file"),
        (["--model", str(damaged)], f"could not load the weights of '{damaged}': "),
    ]
    for args, message in cases:
        code, _, err = train(capsys, "--steps", "2", *args, "--out", str(tmp_path / "run"))
        assert code == 2 and err.count("\n") == 1 and message in err, err
        assert not (tmp_path / "run").exists()
    if Path("/proc").is_dir() and os.access("/proc", os.W_OK):
        code, _, err = train(capsys, "--steps", "2", "--out", "/proc/zoruntime-run")
        assert code == 2 and err.count("\n") == 1 and "/proc/zoruntime-run cannot be created (" in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_replay_on_a_gpu_this_machine_lacks_is_one_line(finished_run: Path, tmp_path: Path, capsys) -> None:
    assert replay_main(["--run", str(finished_run), "--out", str(tmp_path / "r"), "--device", "cuda"]) == 2
    assert (
        capsys.readouterr().err
        == "zoruntime replay: error: --device cuda, but no CUDA GPU is visible; use --device cpu\n"
    )


def test_ctrl_c_while_a_command_loads_is_one_line(capsys, monkeypatch) -> None:
    """Before train's own handler is set (importing torch and transformers takes seconds)."""
    from zoruntime import cli, plan

    def interrupted(argv: list[str]) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(plan, "main", interrupted)
    assert cli.main(["plan", "--model", "opt-1.3b"]) == 130
    assert capsys.readouterr().err == "zoruntime plan: interrupted\n"


def test_a_dev_loss_of_zero_finishes_the_run(tmp_path: Path, capsys, monkeypatch) -> None:
    """Candidate scoring sure of every dev answer rounds its loss to 0: the relative change was a
    ZeroDivisionError after the table, and no summary.json."""
    from zoruntime.train import loop
    from zoruntime.train.data import Evaluation

    async def certain(rt, data) -> Evaluation:
        return Evaluation(0.0, ("accuracy", 1.0))

    monkeypatch.setattr(loop, "evaluate", certain)
    code, out, err = train(capsys, "--steps", "2", "--out", str(tmp_path / "run"))
    assert code == 0, err
    assert "dev loss 0.0000 -> 0.0000 in " in out and (tmp_path / "run" / "summary.json").exists()


def test_a_full_disk_while_journaling_is_one_line_and_resume_ends_where_a_clean_run_does(
    finished_run: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """The disk fills in the middle of step 3's journal line (after step 2's checkpoint): it was a
    traceback of the journal's internals."""
    from zoruntime.journal import Journal

    append = Journal.append

    def disk_full(journal: Journal, record) -> None:
        if record.step == 2:
            journal._file.write('{"step": 2, "se')  # the part of the line that fitted
            journal._file.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        append(journal, record)

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(Journal, "append", disk_full)
        code, _, err = train(capsys, "--steps", "6", "--checkpoint-every", "2", "--out", str(out))
    assert code == 2 and err == (
        "zoruntime train: error: stopped by a file error (No space left on device); continue from the last "
        f"checkpoint with zoruntime train --resume {out}\n"
    )
    code, printed, _ = train(capsys, "--resume", str(out))
    assert code == 0 and "resumed at step 2" in printed
    assert same_weights(finished_run / "model", out / "model")
    assert read_journal(finished_run / "journal.jsonl") == read_journal(out / "journal.jsonl")


def test_a_full_disk_when_a_resume_rewrites_the_configuration_keeps_it(
    finished_run: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """A resume writes ``zoruntime.json`` again: written in place, a full disk left it empty, and
    the folder could be neither resumed nor replayed (a JSONDecodeError traceback)."""
    out = tmp_path / "run"
    assert train(capsys, "--steps", "2", "--checkpoint-every", "2", "--out", str(out))[0] == 0
    (out / "summary.json").unlink()
    configuration = (out / "zoruntime.json").read_text()
    real_open = io.open

    def disk_full(file, mode="r", *args, **kwargs):
        opened = real_open(file, mode, *args, **kwargs)
        if "w" in mode and Path(file).name.startswith("zoruntime.json"):
            opened.close()  # created (or emptied), then nothing fits
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return opened

    with monkeypatch.context() as patch:
        patch.setattr(io, "open", disk_full)
        patch.setattr(builtins, "open", disk_full)
        code, _, err = train(capsys, "--resume", str(out), "--steps", "6")
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err
    assert (out / "zoruntime.json").read_text() == configuration
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("zoruntime")) == ["zoruntime.json"]
    assert train(capsys, "--resume", str(out), "--steps", "6")[0] == 0
    assert same_weights(finished_run / "model", out / "model")
    assert replay_main(["--run", str(out), "--out", str(tmp_path / "replayed")]) == 0
    assert same_weights(out / "model", tmp_path / "replayed")


def test_replay_refuses_a_journal_without_every_step(finished_run: Path, tmp_path: Path, capsys) -> None:
    """A run resumed after its journal was lost starts a new one at the checkpoint: replaying it
    onto the base said "replayed 2 updates" and saved other weights than the run trained."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns(".lock"))
    journal = run / "journal.jsonl"
    header, *records = journal.read_text().splitlines(keepends=True)
    for kept, message in [
        (records[4:], "step 0 is missing; its records run from step 4 to 5"),
        (records[:3] + records[2:], "step 2 is repeated; its records run from step 0 to 5"),
    ]:
        journal.write_text(header + "".join(kept))
        assert replay_main(["--run", str(run), "--out", str(tmp_path / "replayed")]) == 2
        err = capsys.readouterr().err
        assert err == (
            f"zoruntime replay: error: the journal does not hold every step once from step 0 ({message}): replay "
            "would rebuild other weights than the run trained\n"
        )
        assert not (tmp_path / "replayed").exists()


def test_a_damaged_configuration_is_one_line_naming_it(finished_run: Path, tmp_path: Path, capsys) -> None:
    """A damaged ``zoruntime.json`` was a JSONDecodeError traceback on resume, and a line naming
    no file from replay."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, ignore=shutil.ignore_patterns(".lock"))
    (run / "summary.json").unlink()
    configuration = run / "zoruntime.json"
    for text, why in [('{"model": nul', "Expecting value: line 1 column 11 (char 10)"),
                      ("[1]\n", "it does not hold a JSON object")]:  # fmt: skip
        configuration.write_text(text)
        line = (
            f"{configuration} is damaged ({why}); the run cannot be resumed or replayed without it: restore it from a "
            "copy\n"
        )
        assert train(capsys, "--resume", str(run)) == (2, "", f"zoruntime train: error: {line}")
        assert replay_main(["--run", str(run), "--out", str(tmp_path / "replayed")]) == 2
        assert capsys.readouterr().err == f"zoruntime replay: error: {line}"


def test_replay_reads_a_run_on_a_read_only_mount(finished_run: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """Replay only reads the run folder: its lock file, which cannot be created there, was an
    OSError traceback."""
    from zoruntime import runs

    real_open = os.open

    def read_only(path, *args, **kwargs):
        if Path(path) == finished_run / ".lock":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(runs.os, "open", read_only)
    assert replay_main(["--run", str(finished_run), "--out", str(tmp_path / "replayed")]) == 0
    assert same_weights(finished_run / "model", tmp_path / "replayed")
