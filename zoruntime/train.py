"""``zoruntime train``: fine-tune an OPT model with the offloaded runtime, from the command line.

With no arguments it trains the built-in default: a small random-init OPT with a byte-level
tokenizer on a generated corpus, in about 35 s on 2 CPU cores, nothing downloaded. With
``--model`` it loads a local folder or a hub name; ``--task sst2`` uses GLUE SST-2 with MeZO's
prompt and candidate scoring; ``--task lm --text-file F`` trains a causal LM on a text file.

Writes to ``--out``: the model as a Hugging Face folder (``save_pretrained``, safetensors) with
its tokenizer, the resolved configuration with the base model's fingerprint (``zoruntime.json``),
the step journal (``journal.jsonl``), checkpoints (the last step always), a copy of the base for
the built-in default (``base/``) and, with ``--trace``, the timeline (``trace.json``,
``timeline.png``). Every option, the policy and the memory the batch needs are checked before
anything is written; a folder that holds another run is refused (``--resume`` or
``--overwrite``). Bad input ends with a one-line error and exit code 2; Ctrl-C checkpoints the
last completed step and exits with 130.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import PreTrainedModel

from .checkpoint import CheckpointError, checkpoints
from .data.corpus import generated_corpus
from .data.lm import LMTask
from .data.sst2 import DataUnavailable, SST2Task, candidate_accuracy, candidate_loss, load_sst2
from .data.tokenizer import ByteTokenizer
from .distributed import examples_in, init_from_environment, shard
from .engine import Runtime, restore_checkpoint
from .journal import Journal, JournalError, Record, truncate_journal
from .models.fingerprint import weights_fingerprint
from .models.init import load_pretrained_opt, random_opt, tiny_opt_config
from .models.opt import LossFn
from .policies.base import FixedDepth, MemoryBudget, Policy
from .runs import RunFolderError, RunLock, check_writable, clear_run, describe_run, holds_run
from .zo.config import ZOSGD

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}  # fmt: skip
_DEVICE = re.compile(r"^(auto|cpu|cuda)(:(\d+))?$")
BUILT_IN = "built-in"
"""The ``base`` of a run of the built-in default model (its copy is saved in ``OUT/base``)."""


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit code 2."""


class Interrupted(Exception):
    """Ctrl-C: the last completed step was checkpointed; printed as one line, exit code 130."""


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
    stop_after_nonfinite: int = 5
    trace: bool = True
    out: str = "runs/default"
    progress: bool = True
    resume: str | None = None
    overwrite: bool = False


RESUMABLE_CHANGES = ("steps", "eval_every", "checkpoint_every", "stop_after_nonfinite", "trace", "progress", "resume",
                     "out", "overwrite")  # fmt: skip
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
    p.add_argument("--device", default=d.device, help="auto (cuda when present), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=d.dtype, choices=sorted(DTYPES), help="master weights' dtype")
    p.add_argument("--compute-dtype", default=d.compute_dtype, choices=sorted(DTYPES),
                   help="dtype of the forwards (default: --dtype); 16-bit with --dtype fp32: fp32 masters")  # fmt: skip
    p.add_argument("--policy", default=d.policy, help="depth=K (uploads K blocks ahead) or memory=SIZE (e.g. 20GB)")
    p.add_argument(
        "--eval-every", type=int, default=d.eval_every, help="dev evaluation every N steps (0: only at the ends)"
    )
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="full checkpoint every N steps, atomically; always the last (0: only the last)")  # fmt: skip
    p.add_argument("--stop-after-nonfinite", type=int, default=d.stop_after_nonfinite,
                   help="stop when this many steps in a row have a non-finite loss (the run diverged)")  # fmt: skip
    p.add_argument("--resume", default=d.resume, help="continue the run in this --out folder from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start again in an --out folder that holds a run")
    p.add_argument(
        "--trace", action=argparse.BooleanOptionalAction, default=d.trace, help="save trace.json and timeline.png"
    )
    p.add_argument("--out", default=d.out, help="output folder; one run per folder")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d.progress, help="show a progress bar")
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
    """Every option on its own (before anything is loaded or written)."""
    if config.task not in ("lm", "sst2"):
        raise UsageError(f"unknown --task {config.task!r}; choose lm or sst2")
    for name in ("steps", "batch_size", "stop_after_nonfinite"):
        if getattr(config, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {getattr(config, name)}")
    if config.max_length < 2:
        raise UsageError(f"--max-length must be >= 2, got {config.max_length}")
    if config.eval_every < 0:
        raise UsageError(f"--eval-every must be >= 0, got {config.eval_every}")
    if config.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every must be >= 0, got {config.checkpoint_every}")
    if config.text_file is not None:
        if config.task != "lm":
            raise UsageError("--text-file goes with --task lm")
        if Path(config.text_file).is_dir():
            raise UsageError(f"--text-file {config.text_file} is a folder; give a text file")
        if not Path(config.text_file).is_file():
            raise UsageError(f"--text-file {config.text_file} does not exist")
    parse_policy(config.policy)
    try:
        ZOSGD(lr=config.lr, eps=config.eps, weight_decay=config.weight_decay, seed=config.seed)
    except ValueError as error:
        raise UsageError(str(error)) from None
    resolve_device(config.device)
    if config.overwrite and config.resume:
        raise UsageError("--overwrite starts a run again and --resume continues one: give one of them")
    try:
        check_writable(Path(config.out))
    except RunFolderError as error:
        raise UsageError(str(error)) from None
    return config


def resolve_device(text: str) -> str:
    """``auto`` → cuda when present; ``cuda:N`` checked against the GPUs there are."""
    match = _DEVICE.match(text)
    if match is None or (match.group(1) != "cuda" and match.group(2)):
        raise UsageError(f"--device {text!r} is not auto, cpu, cuda or cuda:N")
    kind, index = match.group(1), match.group(3)
    if kind == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"--device {text}, but no CUDA GPU is visible; use --device cpu")
        if index is not None and int(index) >= count:
            raise UsageError(f"--device {text}, but this machine has {count} GPU(s): cuda:0 to cuda:{count - 1}")
    return text


# -- model, tokenizer, plan ---------------------------------------------------------------------------
def load_model(config: TrainConfig, base: Path | None = None) -> tuple[PreTrainedModel, Any]:
    """The model to train (``base``: the saved copy of a resumed built-in run) and its tokenizer."""
    dtype = DTYPES[config.dtype]
    where = config.model if config.model is not None else (str(base) if base is not None else None)
    if where is None:
        return random_opt(tiny_opt_config(num_hidden_layers=4, max_position_embeddings=max(128, config.max_length)),
                          seed=config.seed, dtype=dtype), ByteTokenizer()  # fmt: skip
    try:
        model = load_pretrained_opt(where, dtype)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if ByteTokenizer.saved_in(where):
        return model, ByteTokenizer()
    from transformers import AutoTokenizer

    try:
        return model, AutoTokenizer.from_pretrained(where)
    except OSError as error:
        raise UsageError(f"could not load the tokenizer of {where!r}: {str(error).splitlines()[0]}") from None


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


def activation_bytes(model: PreTrainedModel, rows: int, length: int, itemsize: int) -> int:
    """A generous estimate of a step's working memory beside the weights: the logits of one
    perturbed forward with the loss's fp32 copies, the two hidden-state streams, one block's
    largest intermediate and its attention scores (where the kernel materialises them)."""
    c = model.config
    tokens = rows * length
    logits = tokens * c.vocab_size * (itemsize + 8)
    hidden = tokens * (4 * c.hidden_size + c.ffn_dim) * itemsize
    scores = rows * c.num_attention_heads * length * length * itemsize
    return logits + hidden + scores


def available_bytes(device: str) -> int | None:
    """Free memory where the activations live (None: unknown)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_plan(model: PreTrainedModel, config: TrainConfig, device: str, world_size: int, start_step: int) -> Runtime:
    """The runtime for ``model``, with the policy checked against it and the batch against memory."""
    compute = DTYPES[config.compute_dtype] if config.compute_dtype else None
    policy = parse_policy(config.policy)
    blocks = model.config.num_hidden_layers
    if isinstance(policy, FixedDepth) and policy.depth >= blocks:
        raise UsageError(
            f"--policy {config.policy}: the model has {blocks} blocks, so at most {blocks - 1} uploads can run "
            f"ahead; use depth=1 to {blocks - 1} (or memory=SIZE to keep blocks resident)"
        )
    optimizer = ZOSGD(lr=config.lr, eps=config.eps, weight_decay=config.weight_decay, seed=config.seed)
    try:
        runtime = Runtime(model, optimizer, device=device, policy=policy, compute_dtype=compute, trace=config.trace,
                          loss_fn=candidate_loss if config.task == "sst2" else None, start_step=start_step)  # fmt: skip
    except ValueError as error:
        raise UsageError(f"--policy {config.policy}: {error}") from None
    rows = -(-config.batch_size // world_size) * (2 if config.task == "sst2" else 1)  # sst2: a row per candidate
    need = activation_bytes(model, rows, config.max_length, runtime.compute_dtype.itemsize)
    free = available_bytes(device)
    if free is not None and need > 0.8 * free:
        raise UsageError(
            f"--batch-size {config.batch_size} x --max-length {config.max_length} needs about {need / 1e9:.1f} GB of "
            f"working memory on {device}, and {free / 1e9:.1f} GB is free; lower --batch-size or --max-length"
        )
    return runtime


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
    try:
        losses = [await rt.evaluate(b) for b in batches]
    except FloatingPointError:
        raise UsageError(
            f"the dev loss after step {rt.step_index} is not finite (the run diverged); lower --lr and start again "
            "with --overwrite, or --resume from a checkpoint kept from before"
        ) from None
    loss = sum(v * n for v, n in zip(losses, sizes, strict=True)) / sum(sizes)
    if loss_fn is not candidate_loss:
        return Evaluation(loss)
    accs = [await rt.evaluate(b, metric=candidate_accuracy) for b in batches]
    return Evaluation(loss, sum(a * n for a, n in zip(accs, sizes, strict=True)) / sum(sizes))


@dataclass(frozen=True)
class Start:
    """Where a run begins: step 0, or a checkpoint of an earlier run of the folder."""

    step: int = 0
    before: Evaluation | None = None
    checkpoint: Path | None = None


def resume_point(config: TrainConfig, model: PreTrainedModel, out: Path, say: Any) -> Start | None:
    """For ``--resume``: the checkpoint to continue from (its weights loaded into ``model``), or
    None when the run already finished. Refuses what would throw work away."""
    if not checkpoints(out / "checkpoints"):
        say(f"{out} has no checkpoint yet: starting it over")
        return Start()
    try:
        state = restore_checkpoint(model, out / "checkpoints")
    except CheckpointError as error:
        raise UsageError(str(error)) from None
    for line in state["passed_over"]:
        say(line)
    step = state["step"]
    if config.steps < step:
        raise UsageError(
            f"--steps {config.steps} is below the run's last checkpoint (step {step}): resuming would throw steps "
            f"away; give --steps {step} or more, or start a new run"
        )
    finished = out / "summary.json"
    if step == config.steps and finished.is_file() and json.loads(finished.read_text()).get("steps") == step:
        return None
    before = Evaluation(state["before_loss"], state.get("before_accuracy"))
    return Start(step, before, out / "checkpoints")


def _base_record(config: TrainConfig, model: PreTrainedModel) -> dict[str, Any]:
    """What the run started from: the built-in default (copied into ``base/``) or a model's name
    or path, with a fingerprint of its weights (as loaded, in the run's dtype)."""
    return {"base": config.model or BUILT_IN, "base_fingerprint": weights_fingerprint(model), "dtype": config.dtype}


async def train(config: TrainConfig) -> dict[str, Any]:
    """Run ``config`` end to end (or continue it, with ``resume``); returns the printed, saved summary."""
    check(config)
    device = resolve_device(config.device)
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
    if lead and not config.resume and not config.overwrite and holds_run(out):
        raise UsageError(
            f"{out} already holds a run ({describe_run(out)}): --resume {out} to continue it, --overwrite to "
            "start again, or a new --out"
        )
    with contextlib.ExitStack() as locks:
        lock = lambda: locks.enter_context(RunLock(out, f"zoruntime train, rank {rank}")) if lead else None  # noqa: E731
        if config.resume:
            lock()  # before reading what the run left
        prepared = _prepare(config, device, world_size, out, say)  # everything checked; nothing written yet
        if isinstance(prepared, dict):
            return prepared
        if world_size > 1:
            dist.barrier()  # every rank has read what it needs before rank 0 writes
        if lead and not config.resume:
            lock()  # creates the folder
            if not config.overwrite and holds_run(out):
                raise UsageError(f"{out} now holds a run started meanwhile; choose another --out")
        if lead:
            _write_start(config, prepared, out)
        if prepared.start.checkpoint is not None:
            say(f"resumed at step {prepared.start.step} from {prepared.start.checkpoint}")
        return await _run(config, prepared, rank, world_size, out, say)


@dataclass(frozen=True)
class Prepared:
    """A run checked and ready: nothing of it has been written yet."""

    model: PreTrainedModel
    tokenizer: Any
    task: LMTask | SST2Task
    loss_fn: LossFn | None
    start: Start
    base: dict[str, Any]
    resolved: dict[str, Any]
    runtime: Runtime


def _prepare(config: TrainConfig, device: str, world_size: int, out: Path, say: Any) -> Prepared | dict[str, Any]:
    """Load and check everything; the summary instead when a resumed run already finished."""
    resumed_base = out / "base" if config.resume and config.model is None and (out / "base").is_dir() else None
    model, tokenizer = load_model(config, resumed_base)
    base = _base_record(config, model)
    if config.resume:
        if resumed_base is None and config.model is None:
            say(f"{out} has no copy of its base model; rebuilding the built-in one from --seed {config.seed}")
        saved = json.loads((out / "zoruntime.json").read_text())
        if saved.get("base_fingerprint") not in (None, base["base_fingerprint"]):
            raise UsageError(
                f"the base model {base['base']} is not the one {out} started from (its weights' fingerprint differs); "
                "resume with the model the run started from"
            )
    task = build_task(config, tokenizer)
    start = resume_point(config, model, out, say) if config.resume else Start()
    if start is None:
        say(f"{out}: the run already finished its {config.steps} steps; nothing to do (--steps N continues it)")
        summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
        return summary
    resolved = {**asdict(config), "device": device, "parameters": sum(p.numel() for p in model.parameters()), **base}
    if world_size > 1:
        resolved["world_size"] = world_size
    runtime = check_plan(model, config, device, world_size, start.step)
    say("zoruntime train " + json.dumps(resolved))
    loss_fn: LossFn | None = candidate_loss if config.task == "sst2" else None
    return Prepared(model, tokenizer, task, loss_fn, start, base, resolved, runtime)


def _write_start(config: TrainConfig, prepared: Prepared, out: Path) -> None:
    """The first writes of a run: the old run's files gone (``--overwrite``), the base copy,
    the configuration, the journal cut back to the checkpoint."""
    if config.resume:  # first: a journal damaged before the checkpoint stops the resume with nothing changed
        try:
            truncate_journal(out / "journal.jsonl", prepared.start.step)
        except JournalError as error:
            raise UsageError(str(error)) from None
    if config.overwrite:
        clear_run(out)
    if config.model is None and not (out / "base").is_dir():
        save_model(prepared.model, prepared.tokenizer, out / "base")
    (out / "zoruntime.json").write_text(json.dumps(prepared.resolved, indent=2) + "\n")


async def _run(
    config: TrainConfig, prepared: Prepared, rank: int, world_size: int, out: Path, say: Any
) -> dict[str, Any]:
    model, tokenizer, task, loss_fn, start = (
        prepared.model,
        prepared.tokenizer,
        prepared.task,
        prepared.loss_fn,
        prepared.start,
    )
    runtime, base = prepared.runtime, prepared.base
    lead = rank == 0
    tokens, nonfinite, done = 0, 0, start.step
    before = start.before
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
        loop.add_signal_handler(signal.SIGINT, interrupted.set)
    started = time.perf_counter()
    try:
        async with contextlib.AsyncExitStack() as stack:
            journal = stack.enter_context(Journal(out / "journal.jsonl", header=base)) if lead else None
            rt = await stack.enter_async_context(runtime)

            async def checkpoint(reason: str = "") -> None:
                assert before is not None
                state = {"before_loss": before.loss, "before_accuracy": before.accuracy, "next_batch": done}
                try:
                    await rt.save_checkpoint(out / "checkpoints", state)
                except CheckpointError as error:
                    raise UsageError(str(error)) from None

            if before is None:
                before = await evaluate(rt, task, loss_fn)
                say(f"before: {before}")
            bar = tqdm(total=config.steps, initial=start.step, desc="train", unit="step",
                       disable=not (config.progress and lead), mininterval=0.5)  # fmt: skip
            for step in range(start.step, config.steps):
                batch = task.train_batch(step)
                stats = await rt.step(shard(batch, rank, world_size))
                if journal is not None:
                    journal.append(Record.of(stats, config.eps, config.weight_decay, batch=step))
                done = step + 1
                nonfinite = nonfinite + 1 if stats.skipped else 0
                if nonfinite >= config.stop_after_nonfinite:
                    bar.close()
                    raise UsageError(
                        f"stopped at step {done}: the last {nonfinite} steps had a non-finite loss (the run diverged); "
                        f"lower --lr (it is {config.lr:g}) and start again with --overwrite; the checkpoints kept "
                        f"in {out / 'checkpoints'} are from before"
                    )
                tokens += batch["input_ids"].numel()
                bar.update(1)
                rate = tokens / (time.perf_counter() - started)
                bar.set_postfix(loss=f"{stats.loss:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
                if interrupted.is_set():
                    bar.close()
                    if lead:
                        await checkpoint()
                    raise Interrupted(
                        f"interrupted at step {done}: checkpointed; continue with zoruntime train --resume {out}"
                    )
                if done < config.steps and config.eval_every and done % config.eval_every == 0:
                    evaluation = await evaluate(rt, task, loss_fn)
                    if lead:
                        bar.write(f"step {done}: {evaluation}")
                if lead and done < config.steps and config.checkpoint_every and done % config.checkpoint_every == 0:
                    await checkpoint()
            bar.close()
            if lead and start.step < config.steps:
                await checkpoint()  # the last step, always: a finished run can be extended or checked
            after = await evaluate(rt, task, loss_fn)
            say(f"after:  {after}")
            timeline = rt.timeline if config.trace else None
            skipped = rt.statistics().skipped_steps
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGINT)
    seconds = time.perf_counter() - started
    if world_size > 1:
        torch.distributed.barrier()
    if not lead:
        return {}
    assert before is not None
    model_dir = out / "model"
    save_model(model, tokenizer, model_dir)
    if timeline is not None and timeline.spans:
        timeline.save_chrome_trace(out / "trace.json")
        timeline.training_steps_from(max(start.step, config.steps - 3)).save_png(out / "timeline.png")
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


def save_model(model: PreTrainedModel, tokenizer: Any, folder: Path) -> None:
    """``save_pretrained`` of the model (a copy of its tensors: they may be views of flat groups)
    and the tokenizer."""
    model.save_pretrained(folder, state_dict={k: v.detach().clone() for k, v in model.state_dict().items()})
    tokenizer.save_pretrained(folder)


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
        if args.overwrite and args.resume:
            raise UsageError("--overwrite starts a run again and --resume continues one: give one of them")
        config = resumed_config(args, argv) if args.resume else TrainConfig(**vars(args))
        if not config.progress:  # transformers' loading and shard-writing bars too
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        run(train(config))
    except (UsageError, RunFolderError) as error:
        print(f"zoruntime train: error: {error}", file=sys.stderr, flush=True)
        return 2
    except Interrupted as stop:
        print(f"zoruntime train: {stop}", file=sys.stderr, flush=True)
        return 130
    except KeyboardInterrupt:  # before the run loop: nothing was trained, nothing to keep
        print("zoruntime train: interrupted before the first step; nothing was trained", file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
