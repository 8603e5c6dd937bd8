"""``zoruntime train``: fine-tune an OPT model with the offloaded runtime, from the command line.

With no arguments it trains the built-in default: a small random-init OPT with a byte-level
tokenizer on a generated corpus, in a few minutes on a laptop CPU, nothing downloaded. With
``--model`` it loads a local folder or a hub name; ``--task sst2`` uses GLUE SST-2 with MeZO's
prompt and candidate scoring; ``--task lm --text-file F`` trains a causal LM on a text file.

Writes to ``--out``: the model as a Hugging Face folder (``save_pretrained``, safetensors) with
its tokenizer, the resolved configuration (``zoruntime.json``), the step journal
(``journal.jsonl``) and, with ``--trace``, the timeline (``trace.json``, ``timeline.png``).
Bad input ends with a one-line error and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from .checkpoint import CheckpointError, latest_checkpoint
from .data.corpus import generated_corpus
from .data.lm import LMTask
from .data.sst2 import DataUnavailable, SST2Task, candidate_accuracy, candidate_loss, load_sst2
from .data.tokenizer import ByteTokenizer
from .distributed import examples_in, init_from_environment, shard
from .engine import Runtime, restore_checkpoint
from .journal import Journal, Record, truncate_journal
from .models.init import load_pretrained_opt, random_opt, tiny_opt_config
from .models.opt import LossFn
from .policies.base import FixedDepth, MemoryBudget, Policy
from .zo.config import ZOSGD

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}  # fmt: skip


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit code 2."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; printed at start and saved as ``zoruntime.json``."""

    model: str | None = None
    task: str = "lm"
    text_file: str | None = None
    steps: int = 1000
    lr: float = 2e-3
    eps: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 8
    max_length: int = 64
    seed: int = 0
    device: str = "auto"
    dtype: str = "fp32"
    compute_dtype: str | None = None
    policy: str = "depth=1"
    eval_every: int = 250
    checkpoint_every: int = 250
    trace: bool = True
    out: str = "runs/default"
    progress: bool = True
    resume: str | None = None


RESUMABLE_CHANGES = ("steps", "eval_every", "checkpoint_every", "trace", "progress", "resume", "out")
"""Options a resumed run may change; every other one must match the run it continues."""


def parser(only_given: bool = False) -> argparse.ArgumentParser:
    """The option parser; ``only_given`` leaves out options not on the command line."""
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="zoruntime train",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model", default=d.model, help="local folder or hub name of an OPT model; none: the built-in tiny one"
    )
    p.add_argument("--task", default=d.task, help="lm (causal LM) or sst2 (GLUE SST-2, MeZO's prompt)")
    p.add_argument("--text-file", default=d.text_file, help="text to train on with --task lm; none: a generated corpus")
    p.add_argument("--steps", type=int, default=d.steps, help="ZO-SGD steps")
    p.add_argument("--lr", type=float, default=d.lr, help="learning rate")
    p.add_argument("--eps", type=float, default=d.eps, help="perturbation scale ε")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay (not on biases, norms)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences (sst2: examples) per step")
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens per sequence")
    p.add_argument(
        "--seed", type=int, default=d.seed, help="seeds the directions, the data order and the default model"
    )
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"], help="auto: cuda when present")
    p.add_argument("--dtype", default=d.dtype, choices=sorted(DTYPES), help="master weights' dtype")
    p.add_argument("--compute-dtype", default=d.compute_dtype, choices=sorted(DTYPES),
                   help="dtype of the forwards (default: --dtype); 16-bit with --dtype fp32: fp32 masters")  # fmt: skip
    p.add_argument("--policy", default=d.policy, help="depth=K (uploads K blocks ahead) or memory=SIZE (e.g. 20GB)")
    p.add_argument(
        "--eval-every", type=int, default=d.eval_every, help="dev evaluation every N steps (0: only at the ends)"
    )
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="full checkpoint every N steps, atomically (0: none)")  # fmt: skip
    p.add_argument("--resume", default=d.resume, help="continue the run in this --out folder from its last checkpoint")
    p.add_argument(
        "--trace", action=argparse.BooleanOptionalAction, default=d.trace, help="save trace.json and timeline.png"
    )
    p.add_argument("--out", default=d.out, help="output folder")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    if only_given:
        for action in p._actions:
            action.default = argparse.SUPPRESS
    return p


def parse_policy(text: str) -> Policy:
    """``depth=K`` → FixedDepth(K); ``memory=SIZE`` → MemoryBudget (SIZE: bytes, or 512MB, 20GB, 1.5GiB)."""
    key, _, value = text.partition("=")
    if key == "depth" and value.isdigit():
        return FixedDepth(int(value))
    if key == "memory" and (match := _SIZE.match(value)):
        unit = (match.group(2) or "").lower()
        if unit in _UNITS:
            return MemoryBudget(int(float(match.group(1)) * _UNITS[unit]))
    raise UsageError(f"--policy {text!r} is not depth=K or memory=SIZE (e.g. depth=2, memory=20GB)")


def check(config: TrainConfig) -> TrainConfig:
    if config.task not in ("lm", "sst2"):
        raise UsageError(f"unknown --task {config.task!r}; choose lm or sst2")
    if config.steps <= 0:
        raise UsageError(f"--steps must be > 0, got {config.steps}")
    if config.batch_size <= 0:
        raise UsageError(f"--batch-size must be > 0, got {config.batch_size}")
    if config.max_length < 2:
        raise UsageError(f"--max-length must be >= 2, got {config.max_length}")
    if config.eval_every < 0:
        raise UsageError(f"--eval-every must be >= 0, got {config.eval_every}")
    if config.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every must be >= 0, got {config.checkpoint_every}")
    if config.text_file is not None:
        if config.task != "lm":
            raise UsageError("--text-file goes with --task lm")
        if not Path(config.text_file).is_file():
            raise UsageError(f"--text-file {config.text_file} does not exist")
    parse_policy(config.policy)
    try:
        ZOSGD(lr=config.lr, eps=config.eps, weight_decay=config.weight_decay, seed=config.seed)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA GPU is visible; use --device cpu")
    return config


# -- model and tokenizer ----------------------------------------------------------------------------
def load_model(config: TrainConfig) -> tuple[PreTrainedModel, Any]:
    dtype = DTYPES[config.dtype]
    if config.model is None:
        return random_opt(tiny_opt_config(num_hidden_layers=4, max_position_embeddings=max(128, config.max_length)),
                          seed=config.seed, dtype=dtype), ByteTokenizer()  # fmt: skip
    try:
        model = load_pretrained_opt(config.model, dtype)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if ByteTokenizer.saved_in(config.model):
        return model, ByteTokenizer()
    from transformers import AutoTokenizer

    try:
        return model, AutoTokenizer.from_pretrained(config.model)
    except OSError as error:
        raise UsageError(f"could not load the tokenizer of {config.model!r}: {str(error).splitlines()[0]}") from None


def build_task(config: TrainConfig, tokenizer: Any) -> LMTask | SST2Task:
    if config.task == "sst2":
        try:
            train, dev = load_sst2(train_examples=1000, dev_examples=500, seed=config.seed)
        except DataUnavailable as error:
            raise UsageError(str(error)) from None
        return SST2Task(train, dev, tokenizer, config.max_length, config.batch_size, config.seed)
    if config.text_file is not None:
        text = Path(config.text_file).read_text(encoding="utf-8", errors="replace")
        cut = int(len(text) * 0.9)
        train_text, dev_text = text[:cut], text[cut:]
    else:
        train_text, dev_text = generated_corpus(config.seed)
    try:
        return LMTask(tokenizer.encode(train_text), tokenizer.encode(dev_text), config.max_length,
                      config.batch_size, config.seed)  # fmt: skip
    except ValueError as error:
        raise UsageError(str(error)) from None


# -- the run ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float | None = None

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    def __str__(self) -> str:
        acc = f", accuracy {self.accuracy:.1%}" if self.accuracy is not None else ""
        return f"dev loss {self.loss:.4f}, perplexity {self.perplexity:.2f}{acc}"


async def evaluate(rt: Runtime, task: LMTask | SST2Task, loss_fn: LossFn | None) -> Evaluation:
    """Dev loss (and accuracy for SST-2); with several ranks each evaluates its shard of every batch."""
    batches = [b for b in task.dev_batches() if examples_in(b) >= rt.world_size]
    sizes = [b["input_ids"].shape[0] for b in batches]
    batches = [shard(b, rt.rank, rt.world_size) for b in batches]
    losses = [await rt.evaluate(b) for b in batches]
    loss = sum(v * n for v, n in zip(losses, sizes, strict=True)) / sum(sizes)
    if loss_fn is not candidate_loss:
        return Evaluation(loss)
    accs = [await rt.evaluate(b, metric=candidate_accuracy) for b in batches]
    return Evaluation(loss, sum(a * n for a, n in zip(accs, sizes, strict=True)) / sum(sizes))


async def train(config: TrainConfig) -> dict[str, Any]:
    """Run ``config`` end to end (or continue it, with ``resume``); returns the printed, saved summary."""
    check(config)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
    rank, world_size, local_rank = init_from_environment(device)
    if world_size > 1 and device == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if config.batch_size < world_size:
        raise UsageError(
            f"--batch-size {config.batch_size} is smaller than the {world_size} ranks; give each one example"
        )
    lead = rank == 0  # only rank 0 writes files and prints
    say = print if lead else _silent
    out = Path(config.out)
    model, tokenizer = load_model(config)
    task = build_task(config, tokenizer)
    loss_fn: LossFn | None = candidate_loss if config.task == "sst2" else None
    optimizer = ZOSGD(lr=config.lr, eps=config.eps, weight_decay=config.weight_decay, seed=config.seed)
    resolved = {**asdict(config), "device": device, "parameters": sum(p.numel() for p in model.parameters())}
    if world_size > 1:
        resolved["world_size"] = world_size
    say("zoruntime train " + json.dumps(resolved))
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    start, before = 0, None
    if config.resume and latest_checkpoint(out / "checkpoints") is None:
        say(f"{out} has no checkpoint yet: starting it over")
        if lead:
            truncate_journal(out / "journal.jsonl", 0)
    elif config.resume:
        try:
            state = restore_checkpoint(model, out / "checkpoints")
        except CheckpointError as error:
            raise UsageError(str(error)) from None
        start, before = state["step"], Evaluation(state["before_loss"], state.get("before_accuracy"))
        if lead:
            truncate_journal(out / "journal.jsonl", start)
        say(f"resumed at step {start} from {out / 'checkpoints'}")
    elif lead:
        (out / "journal.jsonl").unlink(missing_ok=True)
    if lead:
        (out / "zoruntime.json").write_text(json.dumps(resolved, indent=2) + "\n")
    compute = DTYPES[config.compute_dtype] if config.compute_dtype else None
    runtime = Runtime(model, optimizer, device=device, policy=parse_policy(config.policy), loss_fn=loss_fn,
                      compute_dtype=compute, trace=config.trace, start_step=start)  # fmt: skip
    tokens = 0
    started = time.perf_counter()
    async with contextlib.AsyncExitStack() as stack:
        journal = stack.enter_context(Journal(out / "journal.jsonl")) if lead else None
        rt = await stack.enter_async_context(runtime)
        if before is None:
            before = await evaluate(rt, task, loss_fn)
            say(f"before: {before}")
        bar = tqdm(total=config.steps, initial=start, desc="train", unit="step",
                   disable=not (config.progress and lead), mininterval=0.5)  # fmt: skip
        for step in range(start, config.steps):
            batch = task.train_batch(step)
            stats = await rt.step(shard(batch, rank, world_size))
            if journal is not None:
                journal.append(Record.of(stats, config.eps, config.weight_decay, batch=step))
            tokens += batch["input_ids"].numel()
            bar.update(1)
            rate = tokens / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{stats.loss:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
            done = step + 1
            if done < config.steps and config.eval_every and done % config.eval_every == 0:
                evaluation = await evaluate(rt, task, loss_fn)
                if lead:
                    bar.write(f"step {done}: {evaluation}")
            if lead and done < config.steps and config.checkpoint_every and done % config.checkpoint_every == 0:
                state = {"before_loss": before.loss, "before_accuracy": before.accuracy, "next_batch": done}
                try:
                    await rt.save_checkpoint(out / "checkpoints", state)
                except CheckpointError as error:
                    raise UsageError(str(error)) from None
        bar.close()
        after = await evaluate(rt, task, loss_fn)
        say(f"after:  {after}")
        timeline = rt.timeline if config.trace else None
        skipped = rt.statistics().skipped_steps
    seconds = time.perf_counter() - started
    if world_size > 1:
        torch.distributed.barrier()
    if not lead:
        return {}
    model_dir = out / "model"
    model.save_pretrained(model_dir, state_dict={k: v.detach().clone() for k, v in model.state_dict().items()})
    tokenizer.save_pretrained(model_dir)
    if timeline is not None:
        timeline.save_chrome_trace(out / "trace.json")
        timeline.training_steps_from(config.steps - 3).save_png(out / "timeline.png")
    summary = {
        "dev_loss_before": before.loss, "dev_loss_after": after.loss,
        "perplexity_before": before.perplexity, "perplexity_after": after.perplexity,
        "accuracy_before": before.accuracy, "accuracy_after": after.accuracy,
        "steps": config.steps, "skipped_steps": skipped, "seconds": seconds,
        "tokens_per_s": tokens / seconds, "out": str(out),
    }  # fmt: skip
    drop = 1 - after.loss / before.loss
    print(f"dev loss {before.loss:.4f} -> {after.loss:.4f} ({drop:.1%} lower) in {seconds:.0f} s; saved {model_dir}"
          + (f"; {skipped} step(s) skipped for a non-finite loss" if skipped else ""))  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _silent(*args: object, **kwargs: object) -> None:
    return None


def resumed_config(args: argparse.Namespace, argv: list[str] | None) -> TrainConfig:
    """The configuration of the run in ``--resume DIR``, with the changes a resume may make."""
    folder = Path(args.resume)
    saved_file = folder / "zoruntime.json"
    if not saved_file.is_file():
        raise UsageError(f"--resume {folder}: no zoruntime.json there; is it the --out folder of a run?")
    fields = set(TrainConfig.__dataclass_fields__)
    saved = {k: v for k, v in json.loads(saved_file.read_text()).items() if k in fields}
    given = vars(parser(only_given=True).parse_args(argv))
    different = {k: (saved.get(k), v) for k, v in given.items() if k not in RESUMABLE_CHANGES and saved.get(k) != v}
    if different:
        changes = ", ".join(
            f"--{k.replace('_', '-')} {new!r} (the run used {old!r})" for k, (old, new) in different.items()
        )
        raise UsageError(f"cannot resume {folder} with a different configuration: {changes}; start a new run instead")
    keep = {k: v for k, v in given.items() if k in RESUMABLE_CHANGES}
    return TrainConfig(**{**saved, **keep, "out": str(folder), "resume": str(folder)})


def main(argv: list[str] | None = None) -> int:
    from .engine import run

    args = parser().parse_args(argv)
    try:
        config = resumed_config(args, argv) if args.resume else TrainConfig(**vars(args))
        run(train(config))
    except UsageError as error:
        print(f"zoruntime train: error: {error}", file=sys.stderr, flush=True)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
