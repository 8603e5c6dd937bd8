"""Data-parallel ZO over torch.distributed (gloo, 2 CPU processes): identical weights on every
rank, the same training as one process up to float reduction order, a few bytes per step."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zoruntime.journal import read_journal

WORKER = Path(__file__).resolve().parent / "dp_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(_free_port()), *args]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("family", ["opt", "llama"])
def test_two_ranks_stay_bitwise_equal_and_match_one_process(tmp_path: Path, family: str) -> None:
    (tmp_path / "dp").mkdir()
    (tmp_path / "single").mkdir()
    subprocess.run(_torchrun(str(WORKER), str(tmp_path / "dp"), family), check=True, capture_output=True, timeout=180)
    subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path / "single"), family], check=True, capture_output=True, timeout=180
    )
    rank0, rank1 = (torch.load(tmp_path / "dp" / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    single = torch.load(tmp_path / "single" / "rank0.pt", weights_only=False)
    assert rank0["world"] == 2 and single["world"] == 1
    assert all(torch.equal(a, b) for a, b in zip(rank0["weights"], rank1["weights"], strict=True))
    assert rank0["stats"] == rank1["stats"]
    # One process over the whole batch: equal up to the order of float reductions. The losses agree
    # to float32 rounding (~1e-6); g = ΔL / 2ε amplifies that by 1/(2ε) = 50, and 5 steps of lr 1e-2
    # carry it into the weights: stated tolerances 2e-5 (losses), 1e-3 (g), 5e-5 (weights).
    for a, b in zip(rank0["stats"], single["stats"], strict=True):
        assert a.seed == b.seed and a.losses[0] == pytest.approx(b.losses[0], abs=2e-5)
        assert a.projected_grads[0] == pytest.approx(b.projected_grads[0], abs=1e-3)
    for a, b in zip(rank0["weights"], single["weights"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=5e-5)
    # a shard with nothing to score (step 4, and the evaluation before it) adds nothing: it was nan
    assert rank0["evaluated"] == pytest.approx(single["evaluated"], abs=2e-5)
    # all that crossed between ranks: one all-reduce of three float64 numbers per step, two for the evaluation
    assert rank0["bytes"] == 5 * 24 + 16 and single["bytes"] == 0


@pytest.mark.slow
def test_torchrun_train_writes_files_from_rank_zero_only(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = subprocess.run(_torchrun("-m", "zoruntime", "train", "--steps", "6", "--eval-every", "3",
                                    "--checkpoint-every", "3", "--no-progress", "--out", str(out),
                                    "--batch-size", "7", "--directions", "auto", "--gpu-profile", "h200"),
                          capture_output=True, text=True, timeout=180)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    records = read_journal(out / "journal.jsonl")
    assert [r.step for r in records] == list(range(6))  # not twice
    assert len({len(r.projected_grads) for r in records}) == 1  # shards of 4 and 3 rows: one q for both ranks
    assert done.stdout.count("after:  dev loss") == 1
    assert json.loads((out / "zoruntime.json").read_text())["world_size"] == 2
    assert (out / "model" / "model.safetensors").exists()
    # every dev batch counts, the last one of a single row too (whole on each rank): as one process
    import zoruntime
    from zoruntime.train.data import build_data, evaluate
    from zoruntime.train.model import load_model
    from zoruntime.train.options import TrainConfig

    config = TrainConfig(batch_size=7)
    model, tokenizer = load_model(config)
    data = build_data(config, tokenizer)
    assert data.dev_batches()[-1]["input_ids"].shape[0] == 1

    async def before() -> float:
        async with zoruntime.Runtime(model, zoruntime.ZOSGD()) as rt:
            return (await evaluate(rt, data)).loss

    dev = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(line for line in dev if line["kind"] == "dev")
    assert first["step"] == 0 and first["loss"] == pytest.approx(zoruntime.run(before()), abs=2e-6)


def test_sharding_keeps_candidate_rows_together() -> None:
    from zoruntime.distributed import shard

    batch = {"input_ids": torch.arange(12).view(6, 2), "label": torch.tensor([0, 1, 0])}  # 3 examples x 2 rows
    mine = shard(batch, rank=1, world_size=2)
    assert mine["input_ids"].tolist() == [[4, 5], [6, 7]] and mine["label"].tolist() == [1]
    plain = shard({"input_ids": torch.arange(5)[:, None]}, rank=0, world_size=2)
    assert plain["input_ids"].view(-1).tolist() == [0, 2, 4]
