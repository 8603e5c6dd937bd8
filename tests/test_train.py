"""`zoruntime train`: the default run end to end, real loading from a local folder, the LM task on a
text file, SST-2 prompts and candidate scoring, and one-line errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from safetensors import safe_open
from transformers import GPT2Config, GPT2LMHeadModel, OPTForCausalLM

import zoruntime
from zoruntime.data.sst2 import (
    WORDS,
    candidate_accuracy,
    candidate_batch,
    candidate_loss,
    candidate_scores,
    prompt_rows,
)
from zoruntime.data.tokenizer import ByteTokenizer
from zoruntime.journal import read_journal
from zoruntime.models import random_opt, tiny_opt_config


def _train(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zoruntime", "train", "--no-progress", *args],
        capture_output=True, text=True, timeout=150, check=False, env={**os.environ, **(env or {})},
    )  # fmt: skip


@pytest.mark.slow
def test_default_run_writes_a_model_folder_that_from_pretrained_loads(tmp_path: Path) -> None:
    done = _train("--steps", "40", "--eval-every", "20", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert (
        "before: dev loss" in done.stdout and "after:  dev loss" in done.stdout and "step 20: dev loss" in done.stdout
    )
    trained = OPTForCausalLM.from_pretrained(tmp_path / "model")
    start = random_opt(tiny_opt_config(num_hidden_layers=4), seed=0)
    assert trained.lm_head.weight is trained.model.decoder.embed_tokens.weight
    with safe_open(tmp_path / "model" / "model.safetensors", "pt") as saved:
        names = set(saved.keys())
    assert "model.decoder.embed_tokens.weight" in names and "lm_head.weight" not in names  # the tied head once
    differs = [not torch.equal(a, b) for a, b in zip(trained.parameters(), start.parameters(), strict=True)]
    assert all(differs)
    config = json.loads((tmp_path / "zoruntime.json").read_text())
    assert config["steps"] == 40 and config["device"] == "cpu" and config["policy"] == "depth=1"
    assert [r.step for r in read_journal(tmp_path / "journal.jsonl")] == list(range(40))
    assert (tmp_path / "trace.json").exists() and (tmp_path / "timeline.png").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dev_loss_after"] < summary["dev_loss_before"]


@pytest.mark.slow
def test_lm_task_on_a_text_file_from_a_locally_saved_model(tmp_path: Path) -> None:
    folder = tmp_path / "base"
    tiny_model(num_hidden_layers=2, vocab_size=260).save_pretrained(folder)
    ByteTokenizer().save_pretrained(folder)
    text = tmp_path / "poem.txt"
    text.write_text("roses are red, violets are blue, zeroth order training is something new. " * 40)
    done = _train("--model", str(folder), "--text-file", str(text), "--steps", "10", "--max-length", "32",
                  "--batch-size", "4", "--policy", "memory=1MB", "--no-trace",
                  "--out", str(tmp_path / "run"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(read_journal(tmp_path / "run" / "journal.jsonl")) == 10
    assert OPTForCausalLM.from_pretrained(tmp_path / "run" / "model").config.num_hidden_layers == 2


def test_sst2_prompt_rows_mark_only_the_candidate_word() -> None:
    tokenizer = ByteTokenizer()
    rows = prompt_rows("a gripping film", tokenizer, max_length=64)
    assert len(rows) == len(WORDS) == 2
    for (ids, labels), word in zip(rows, WORDS, strict=True):
        assert tokenizer.decode(ids) == f"a gripping film It was {word}."
        assert tokenizer.decode([t for t in labels if t >= 0]) == f" {word}"
        assert ids[0] == tokenizer.bos_token_id
    cut = prompt_rows("a very long review " * 10, tokenizer, max_length=40)
    assert all(len(ids) == 40 and tokenizer.decode(ids).endswith("It was terrible.") for ids, _ in cut[:1])


def test_sst2_candidate_scoring_picks_the_likelier_word_and_scores_it_exactly() -> None:
    tokenizer = ByteTokenizer()
    examples = [("a gripping film", 1), ("dull and long", 0)]
    raw = candidate_batch(examples, tokenizer, max_length=64)
    model = tiny_model(vocab_size=260, max_position_embeddings=64)
    batch = zoruntime.OPTAdapter(model).validate(raw)
    assert batch.extras["label"].tolist() == [1, 0]
    logits = model(batch.input_ids, attention_mask=batch.attention_mask).logits
    scores = candidate_scores(logits, batch)
    logp = torch.log_softmax(logits.float(), dim=-1)
    for row in range(4):  # the hand computation: sum of log p(token | prefix) over the word's tokens
        positions = [t for t in range(1, batch.labels.shape[1]) if batch.labels[row, t] >= 0]
        manual = sum(logp[row, t - 1, batch.labels[row, t]] for t in positions)
        torch.testing.assert_close(scores.view(-1)[row], manual)
    expected_loss = torch.nn.functional.cross_entropy(scores, torch.tensor([1, 0]))
    torch.testing.assert_close(candidate_loss(logits, batch), expected_loss)
    accuracy = (scores.argmax(dim=1) == torch.tensor([1, 0])).float().mean()
    assert candidate_accuracy(logits, batch) == accuracy


@pytest.mark.asyncio
async def test_candidate_loss_trains_through_the_runtime() -> None:
    tokenizer = ByteTokenizer()
    raw = candidate_batch([("fine", 1), ("awful", 0), ("great fun", 1)], tokenizer, max_length=32)
    model = tiny_model(vocab_size=260, max_position_embeddings=64, num_hidden_layers=3)
    async with zoruntime.Runtime(model, zoruntime.ZOSGD(lr=1e-2), loss_fn=candidate_loss) as rt:
        stats = await rt.step(raw)
        accuracy = await rt.evaluate(raw, metric=candidate_accuracy)
    assert stats.losses[0] != stats.losses[1]
    assert accuracy == pytest.approx(round(accuracy * 3) / 3)  # a fraction of the three examples


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "qa"], "unknown --task 'qa'; choose lm, sst2, classify, choice or generate"),
        (["--text-file", "/no/such/file.txt"], "--text-file /no/such/file.txt does not exist"),
        (["--steps", "0"], "--steps must be > 0, got 0"),
        (["--batch-size", "-2"], "--batch-size must be > 0, got -2"),
        (["--lr", "-1"], "lr must be a finite number >= 0"),
        (["--policy", "fast"], "--policy 'fast' is not depth=K, memory=SIZE or fit=SIZE"),
        (["--model", "/no/such/folder"], "the folder '/no/such/folder' does not exist; give the folder the model was"),
        (["--device", "cpu", "--cuda-graphs"], "--cuda-graphs replays CUDA graphs and needs a GPU; leave it off with"),
    ],
)
def test_bad_input_is_one_line_and_a_non_zero_exit(args: list[str], message: str, tmp_path: Path, capsys) -> None:
    from zoruntime.train import main as train_main  # in process: each case would pay a fresh import

    assert train_main(["--no-progress", *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and message in err, err


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--lr", "-1"], "--lr must be a finite number >= 0, got -1.0; pass e.g. --lr 1e-6"),
        (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0, got -1.0"),
        (["--freeze", "foo"], "--freeze 'foo': 'foo' is not embeddings, head, blocks:A-B or blocks:N (e.g. --freeze "
                              "embeddings,head,blocks:0-11)"),
    ],
)  # fmt: skip
def test_an_option_wrong_whatever_the_dtype_is_named_by_its_flag_and_not_blamed_on_the_dtype(
    args: list[str], line: str, tmp_path: Path, capsys
) -> None:
    """Under --dtype auto these said "lr must ..." and ended "(--dtype auto: fp32, as the model was saved)"."""
    from zoruntime.train import main as train_main

    assert train_main(["--no-progress", *args, "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"zoruntime train: error: {line}\n"


def test_a_model_folder_that_is_not_opt(tmp_path: Path) -> None:
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    done = _train("--model", str(tmp_path / "gpt2"), "--out", str(tmp_path / "run"))
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert "is a 'gpt2' model; zoruntime trains these model types: apertus, arcee, " in done.stderr
    assert all(f" {kind}," in done.stderr for kind in ("llama", "mistral", "opt", "qwen2", "qwen3"))


def test_offline_hub_model_and_missing_dataset_say_what_to_download(tmp_path: Path) -> None:
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    hub = _train("--model", "facebook/opt-125m", "--out", str(tmp_path), env=offline)
    assert hub.returncode == 2 and "huggingface-cli download facebook/opt-125m" in hub.stderr
    sst2 = _train("--task", "sst2", "--out", str(tmp_path), env=offline)
    assert sst2.returncode == 2 and sst2.stderr.strip().count("\n") == 0
    assert "pip install datasets" in sst2.stderr or "could not load GLUE SST-2" in sst2.stderr


def test_help_explains_every_option_with_its_default() -> None:
    out = subprocess.run([sys.executable, "-m", "zoruntime", "train", "--help"], capture_output=True, text=True).stdout
    options = ["--steps", "--lr", "--eps", "--weight-decay", "--batch-size", "--max-length", "--seed", "--device",
               "--dtype", "--policy", "--eval-every", "--trace", "--out", "--model", "--task",
               "--text-file"]  # fmt: skip
    for option in options:
        assert option in out
    assert "(default: 1000)" in out and "(default: depth=1)" in out
    assert "the default model (default: 0)" in " ".join(out.split())  # "default" in a help is not its default


def test_the_policy_option_reads_depth_memory_and_offload_every() -> None:
    from zoruntime.policies import FixedDepth, MemoryBudget
    from zoruntime.train.options import UsageError, parse_policy

    assert parse_policy("depth=2") == FixedDepth(2)
    assert parse_policy("depth=1,offload=4") == FixedDepth(1, offload_every=4)
    assert parse_policy("memory=2MB,offload=3") == MemoryBudget(2 * 10**6, offload_every=3)
    with pytest.raises(UsageError, match=r"after the comma give offload=N with N >= 1"):
        parse_policy("depth=1,offload=0")
    assert parse_policy("memory=2MB,depth=2,unit=linear") == MemoryBudget(2 * 10**6, 2, unit="linear")
    with pytest.raises(UsageError, match=r"and/or depth=K \(with memory=\)"):
        parse_policy("memory=2MB,depth=x")
    with pytest.raises(UsageError, match=r"after the comma give offload=N"):
        parse_policy("depth=1,depth=2")  # depth= after a comma goes with memory= only


@pytest.mark.parametrize(
    "policy",
    [
        "depth=0", "depth=2,offload=4", "depth=1,unit=linear", "memory=123456789,depth=1",
        "memory=5,depth=0,offload=3,unit=half",
    ],
)  # fmt: skip
def test_policy_arg_writes_a_policy_as_the_policy_option_reads_it(policy: str) -> None:
    from zoruntime.train.options import parse_policy, policy_arg

    assert policy_arg(parse_policy(policy)) == policy


def test_fit_names_the_memory_to_plan_within_and_refuses_what_is_not_a_size() -> None:
    from zoruntime.train.options import UsageError, parse_fit

    assert parse_fit("fit=24GB") == 24 * 10**9 and parse_fit("depth=1") is None
    with pytest.raises(UsageError, match=r"fit= takes the GPU memory to plan within, e.g. fit=24GB"):
        parse_fit("fit=lots")


def test_fit_runs_the_fastest_plan_the_planner_finds_and_the_run_keeps_it(tmp_path: Path, capsys) -> None:
    """``--policy fit=SIZE`` with an H200's profile on the built-in model and batch (8 x 64,
    fp32): the plan ``best`` finds for that model and batch, said once, saved as the run's
    policy, and within SIZE; resuming runs the same plan. Nothing fits in too little, and on a CPU
    without a profile there is nothing to plan from: each one line. (In process: each run in a
    process of its own would pay a fresh import.)"""
    from zoruntime.planning.planner import best
    from zoruntime.planning.profiles import BUILT_IN
    from zoruntime.train import main as train_main
    from zoruntime.train.options import policy_arg
    from zoruntime.workloads import workloads

    run = ["--no-progress", "--no-trace", "--out", str(tmp_path / "run")]
    assert (
        train_main([*run, "--steps", "2", "--eval-every", "0", "--policy", "fit=100MB", "--gpu-profile", "h200"]) == 0
    )
    said = capsys.readouterr().out
    config = tiny_opt_config(num_hidden_layers=4, max_position_embeddings=128)
    found = best(list(workloads(config, torch.float32, 8, 64).values()), BUILT_IN["h200"], 100 * 10**6)
    assert found is not None and found.chosen is not None and found.gpu_bytes <= 100 * 10**6
    saved = json.loads((tmp_path / "run" / "zoruntime.json").read_text())
    assert saved["policy"] == policy_arg(found.chosen)
    assert f"--policy fit=100MB: {found.policy}, predicted on the h200 profile" in said
    assert train_main(["--no-progress", "--resume", str(tmp_path / "run"), "--steps", "3"]) == 0
    assert json.loads((tmp_path / "run" / "zoruntime.json").read_text())["policy"] == saved["policy"]
    assert "predicted on the h200 profile" not in capsys.readouterr().out  # nothing planned again
    for policy, message in (
        ("fit=10MB", "--policy fit=10MB: nothing fits in 10 MB at --batch-size 8 x --max-length 64; the least"),
        ("fit=1GB", None),
    ):
        profile = ["--gpu-profile", "h200"] if message else ["--device", "cpu"]
        assert train_main(["--no-progress", "--policy", policy, *profile, "--out", str(tmp_path / policy)]) == 2
        err = capsys.readouterr().err
        assert err.strip().count("\n") == 0
        assert (message or "--policy fit=1GB plans for a GPU: on cpu give --gpu-profile h200") in err
