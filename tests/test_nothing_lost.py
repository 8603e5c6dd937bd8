"""Nothing lost: the journal survives a torn write, checkpoints survive a full disk, a run killed at
random points resumes to bitwise the same weights, and the journal alone rebuilds them."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, tiny_model, token_batch
from safetensors.torch import load_file

import zoruntime
from zoruntime import checkpoint
from zoruntime.bench.soak import soak
from zoruntime.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, restore_checkpoint
from zoruntime.data.tokenizer import ByteTokenizer
from zoruntime.journal import VERSION, Journal, JournalError, Record, read_header, read_journal, truncate_journal
from zoruntime.models import random_opt, tiny_opt_config
from zoruntime.policies import FixedDepth
from zoruntime.zo import DIRECTION_SCHEME

ARGS = ["--steps", "150", "--checkpoint-every", "15", "--eval-every", "0", "--no-trace", "--max-length", "32"]


def _record(step: int) -> Record:
    return Record(step, 1000 + step, 1e-3, 1e-3, 0.0, [2.0, 1.9], [50.0], step)


def test_journal_ignores_a_torn_last_record_and_refuses_a_corrupt_middle(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    with Journal(path, header={"base": "here"}) as journal:
        for step in range(3):
            journal.append(_record(step))
    with open(path, "a") as file:
        file.write('{"step": 3, "seed": 10')  # the process died mid-write
    assert [r.step for r in read_journal(path)] == [0, 1, 2]
    assert read_header(path) == {"zoruntime_journal": VERSION, "base": "here", "direction_scheme": DIRECTION_SCHEME}
    lines = path.read_text().split("\n")
    path.write_text("\n".join([lines[0], lines[1], "not json", lines[3], ""]))
    with pytest.raises(JournalError, match=r"journal.jsonl, line 3: damaged record before the last line"):
        read_journal(path)


def test_appending_after_a_torn_line_or_a_failed_write_starts_a_line_of_its_own(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        journal.append(_record(0))
    with open(path, "a") as file:
        file.write('{"step": 1, "seed": 10')  # the process died mid-write
    with Journal(path) as journal:
        journal.append(_record(1))
        with monkeypatch.context() as patch:
            patch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
            with pytest.raises(OSError, match="I/O error"):
                journal.append(_record(2))
        journal.append(_record(2))
    assert read_journal(path) == [_record(0), _record(1), _record(2)]


def test_truncating_the_journal_keeps_the_header_and_earlier_steps(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    with Journal(path, header={"base": "here"}) as journal:
        for step in range(10):
            journal.append(_record(step))
    lines = path.read_text().split("\n")
    lines[9] = "damaged"  # step 8: after the resume point, so it is redone anyway
    path.write_text("\n".join(lines))
    assert truncate_journal(path, 6) == 6
    assert [r.step for r in read_journal(path)] == list(range(6))
    assert read_header(path) == {"zoruntime_journal": VERSION, "base": "here", "direction_scheme": DIRECTION_SCHEME}
    lines = path.read_text().split("\n")
    lines[3] = "damaged"  # step 2: before it, so the resumed run cannot be rebuilt
    path.write_text("\n".join(lines))
    with pytest.raises(JournalError, match=r"line 4: damaged record"):
        truncate_journal(path, 6)


def _set_first_line(path: Path, first: str | None) -> None:
    """Replace (or with None, remove) the journal's first line."""
    lines = path.read_text().split("\n")
    path.write_text("\n".join(lines[1:] if first is None else [first, *lines[1:]]))


def test_a_journal_of_another_direction_scheme_is_refused_everywhere_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:  # even without a header of the caller's, the scheme is recorded
        journal.append(_record(0))
    assert read_header(path) == {"zoruntime_journal": VERSION, "direction_scheme": DIRECTION_SCHEME}
    with Journal(path) as journal:  # appending to a journal of this scheme
        journal.append(_record(1))
    assert [r.step for r in read_journal(path)] == [0, 1]
    good = path.read_text()
    for first, written in [
        ('{"zoruntime_journal": 1, "base": "here", "direction_scheme": 1}', "was written with direction scheme 1"),
        (
            '{"zoruntime_journal": 1, "base": "here"}',
            "records no direction scheme (it was written before zoruntime recorded one: scheme 1)",
        ),
        (None, "records no direction scheme"),  # no header at all: written before headers existed
    ]:
        path.write_text(good)
        _set_first_line(path, first)
        before = path.read_bytes()
        message = f"journal {path} {written}"
        for read in (read_journal, read_header, lambda p: truncate_journal(p, 1), Journal):
            with pytest.raises(JournalError, match=r"this zoruntime draws scheme 2: .*replay or resume it with the "
                               r"zoruntime version that wrote it") as error:  # fmt: skip
                read(path)
            assert str(error.value).startswith(message) and "\n" not in str(error.value)
        assert path.read_bytes() == before  # nothing was cut or appended
    path.write_text(good)
    _set_first_line(path, "{damaged")
    with pytest.raises(JournalError, match=r"journal.jsonl, line 1: damaged header; the direction scheme"):
        read_journal(path)
    path.write_text("")  # created, then killed before the header was written: nothing to refuse
    assert read_journal(path) == [] and read_header(path) is None


def test_a_checkpoint_of_another_direction_scheme_is_refused_not_passed_over(tmp_path: Path) -> None:
    groups = {"resident": torch.arange(4.0)}
    older = checkpoint.save_checkpoint(tmp_path, 2, groups, {"next_batch": 2})
    newest = checkpoint.save_checkpoint(tmp_path, 4, groups, {"next_batch": 4})
    assert json.loads((newest / "state.json").read_text())["direction_scheme"] == DIRECTION_SCHEME
    assert load_checkpoint(tmp_path)[1] == {"step": 4, "next_batch": 4, "direction_scheme": DIRECTION_SCHEME}
    for scheme, written in [(1, "was written with direction scheme 1"), (None, "records no direction scheme")]:
        state = {"step": 4, "next_batch": 4} | ({} if scheme is None else {"direction_scheme": scheme})
        (newest / "state.json").write_text(json.dumps(state))
        with pytest.raises(CheckpointError) as error:  # the older one (of this scheme) is not used instead
            load_checkpoint(tmp_path)
        message = str(error.value)
        assert message.startswith(f"the checkpoint {newest} {written}") and "\n" not in message
        assert "this zoruntime draws scheme 2" in message and "with the zoruntime version that wrote it" in message
    assert older.exists()


@pytest.mark.asyncio
@pytest.mark.parametrize(("family", "unit"), [*((family, "block") for family in FAMILIES), (FAMILIES[0], "linear"),
                                              (FAMILIES[-1], "half")])  # fmt: skip
async def test_a_checkpoint_holds_every_update_and_restores_exactly(tmp_path: Path, family: str, unit: str) -> None:
    """Whatever units the run streamed: its checkpoint holds a group a unit, and the twin is
    restored through an adapter cutting its blocks the same way."""
    model, twin = tiny_model(family, num_hidden_layers=3), tiny_model(family, num_hidden_layers=3)
    config = zoruntime.ZOSGD(lr=1e-2, seed=3)
    async with zoruntime.Runtime(model, config, policy=FixedDepth(1, unit=unit)) as rt:
        for i in range(4):
            await rt.step(token_batch(model.config, seed=i))
        folder = await rt.save_checkpoint(tmp_path, {"next_batch": 4})
        assert not rt.statistics().pending_update  # applied before the snapshot
        after = [await rt.step(token_batch(model.config, seed=i)) for i in (4, 5)]
    assert folder.name == "checkpoint-00000004" and latest_checkpoint(tmp_path) == folder
    state = restore_checkpoint(twin, tmp_path)
    assert state["step"] == 4 and state["next_batch"] == 4
    async with zoruntime.Runtime(twin, config, policy=FixedDepth(1, unit=unit), start_step=state["step"]) as rt:
        again = [await rt.step(token_batch(twin.config, seed=i)) for i in (4, 5)]
    assert again == after
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))


@pytest.mark.asyncio
async def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    model = tiny_model(num_hidden_layers=2)
    async with zoruntime.Runtime(model, zoruntime.ZOSGD(lr=1e-2)) as rt:
        await rt.step(token_batch(model.config))
        first = await rt.save_checkpoint(tmp_path)
        await rt.step(token_batch(model.config, seed=1))

        def disk_full(tensors, path):
            Path(path).write_bytes(b"\0" * 100)  # a partial file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

        monkeypatch.setattr(checkpoint, "save_file", disk_full)
        with pytest.raises(
            CheckpointError,
            match=r"step 2 .*No space left on device; the previous checkpoint \(checkpoint-00000001\) is intact",
        ):
            await rt.save_checkpoint(tmp_path)
    assert latest_checkpoint(tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-00000001", "latest"]
    groups, state, _ = load_checkpoint(tmp_path)
    assert state["step"] == 1 and {"embed_head", "block.1"} <= set(groups)


def test_a_failed_sync_of_the_folder_says_the_checkpoint_is_complete_not_that_the_previous_one_is_kept(
    tmp_path: Path, monkeypatch
) -> None:
    checkpoint.save_checkpoint(tmp_path, 1, {"embed_head": torch.zeros(3)}, {})
    sync = checkpoint._fsync

    def failing_on_the_folder(path: Path) -> None:
        if path == tmp_path:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        sync(path)

    monkeypatch.setattr(checkpoint, "_fsync", failing_on_the_folder)
    with pytest.raises(
        CheckpointError, match=r"step 2 .*Input/output error; it is complete and latest names it, but a power loss"
    ):
        checkpoint.save_checkpoint(tmp_path, 2, {"embed_head": torch.ones(3)}, {})
    groups, state, _ = load_checkpoint(tmp_path)
    assert state["step"] == 2 and torch.equal(groups["embed_head"], torch.ones(3))


def test_restoring_into_a_different_model_is_refused(tmp_path: Path) -> None:
    async def write() -> None:
        model = tiny_model(num_hidden_layers=2)
        async with zoruntime.Runtime(model, zoruntime.ZOSGD()) as rt:
            await rt.save_checkpoint(tmp_path)

    zoruntime.run(write())
    with pytest.raises(CheckpointError, match=r"written for a different model"):
        restore_checkpoint(tiny_model(num_hidden_layers=3), tmp_path)
    with pytest.raises(CheckpointError, match=r"no checkpoint in"):
        load_checkpoint(tmp_path / "nowhere")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "zoruntime", "train", "--no-progress", *args]


def _lines(path: Path) -> int:
    return path.read_text().count("\n") if path.exists() else 0


@pytest.mark.slow
def test_killed_at_random_points_and_resumed_the_run_ends_bitwise_where_an_uninterrupted_one_does(
    tmp_path: Path,
) -> None:
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(_cli(*ARGS, "--out", str(clean)), check=True, capture_output=True, timeout=120)
    rng = random.Random(1234)
    kill_points = sorted(rng.sample(range(10, 145), 3))
    command = _cli(*ARGS, "--out", str(killed))
    for point in kill_points:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while _lines(killed / "journal.jsonl") < point and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        process.send_signal(signal.SIGKILL)
        process.wait()
        command = _cli("--resume", str(killed))
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    a, b = load_file(clean / "model" / "model.safetensors"), load_file(killed / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_journal(clean / "journal.jsonl") == read_journal(killed / "journal.jsonl")


def test_resuming_with_a_different_config_or_model_is_refused(tmp_path: Path, capsys) -> None:
    from zoruntime.train import main as train_main

    out = tmp_path / "run"
    assert train_main(["--steps", "4", "--checkpoint-every", "2", "--no-trace", "--eval-every", "0",
                       "--no-progress", "--out", str(out)]) == 0  # fmt: skip
    capsys.readouterr()
    for extra, message in [
        (["--lr", "0.1"], "--lr 0.1 (the run used 0.002)"),
        (["--model", str(tmp_path)], "--model"),
        (["--seed", "3"], "--seed 3 (the run used 0)"),
    ]:
        assert train_main(["--resume", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert "cannot resume" in err and message in err, err
    assert train_main(["--resume", str(tmp_path)]) == 2
    assert "no zoruntime.json there" in capsys.readouterr().err
    if not torch.cuda.is_available():  # auto names the device the run resolved (the CPU): not a change
        assert train_main(["--resume", str(out), "--device", "auto", "--steps", "5", "--no-progress"]) == 0


@pytest.mark.slow
def test_replay_rebuilds_the_trained_weights_from_the_base_and_the_journal(tmp_path: Path) -> None:
    base = tmp_path / "base"
    random_opt(tiny_opt_config(num_hidden_layers=3), seed=4).save_pretrained(base)
    ByteTokenizer().save_pretrained(base)
    run = tmp_path / "run"
    subprocess.run(_cli("--model", str(base), "--steps", "60", "--weight-decay", "0.01", "--eval-every", "0",
                        "--no-trace", "--out", str(run)), check=True, capture_output=True, timeout=120)  # fmt: skip
    journal = run / "journal.jsonl"
    assert journal.stat().st_size < 300 * 60  # a few hundred bytes a step
    replay = [sys.executable, "-m", "zoruntime", "replay", "--base", str(base), "--journal", str(journal)]
    done = subprocess.run([*replay, "--out", str(tmp_path / "replayed")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "replayed 60 updates" in done.stdout
    a = load_file(run / "model" / "model.safetensors")
    b = load_file(tmp_path / "replayed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((run / "zoruntime.json").read_text())["weight_decay"] == 0.01


def test_replay_with_a_missing_journal_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "none.jsonl"
    replay = [sys.executable, "-m", "zoruntime", "replay", "--base", "x", "--journal", str(missing)]
    done = subprocess.run([*replay, "--out", str(tmp_path)], capture_output=True, text=True)
    assert (
        done.returncode == 2
        and done.stderr.strip() == f"zoruntime replay: error: the journal {tmp_path / 'none.jsonl'} does not exist"
    )


def test_soak_with_injected_faults_ends_like_a_clean_run_and_leaks_nothing() -> None:
    result = soak(steps=120, fault_rate=0.03, seed=1)
    assert result["failed_steps"] > 0
    assert result["weights_equal_clean_run"]
    assert result["tasks_left"] == 0 and result["threads_left"] == []
