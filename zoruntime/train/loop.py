"""A run, start to end: the run folder (the lock, the checks before any write, ``--resume`` and
``--overwrite``), the step loop with its journal, evaluations, checkpoints and Ctrl-C, and the
summary. Only rank 0 writes files and prints.

Knows the run folder's files and the order they are written in, and uses the other modules for
the options, the model and the data. Knows nothing of parsing the command line or of exit codes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import PreTrainedModel

from ..checkpoint import CheckpointError, checkpoints, restore_checkpoint
from ..data.tasks import Task, metric_key, show_metric
from ..distributed import init_from_environment, shard
from ..engine import Runtime
from ..journal import Journal, JournalError, Record, truncate_journal
from ..runs import CONFIGURATION, RunLock, clear_run, describe_run, holds_run, read_configuration, replace_file
from .data import Evaluation, build_data, evaluate
from .model import base_record, check_plan, fitted_policy, load_model, resolve_dtype, save_model
from .options import TrainConfig, UsageError, check, parse_fit, resolve_device, with_absolute_paths
from .watch import MetricsLog, save_curves, summary_table


class Interrupted(Exception):
    """Ctrl-C: the last completed step was checkpointed; printed as one line, exit code 130."""


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
    return Start(step, before_from_state(state), out / "checkpoints")


def before_from_state(state: dict[str, Any]) -> Evaluation:
    """The run's first evaluation as a checkpoint keeps it (one written before metrics had names
    kept an accuracy)."""
    if state.get("before_accuracy") is not None:
        return Evaluation(state["before_loss"], ("accuracy", state["before_accuracy"]))
    metric = state.get("before_metric")
    return Evaluation(state["before_loss"], (metric[0], metric[1]) if metric is not None else None)


async def train(config: TrainConfig) -> dict[str, Any]:
    """Run ``config`` end to end (or continue it, with ``resume``); returns the printed, saved summary."""
    config = resolve_dtype(with_absolute_paths(check(config)))
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
        config = prepared.config
        if world_size > 1:
            dist.barrier()  # every rank has read what it needs before rank 0 writes
        if lead and not config.resume:
            lock()  # creates the folder
            if not config.overwrite and holds_run(out):
                raise UsageError(f"{out} now holds a run started meanwhile; choose another --out")
        try:
            if lead:
                _write_start(config, prepared, out)
            if prepared.start.checkpoint is not None:
                say(f"resumed at step {prepared.start.step} from {prepared.start.checkpoint}")
            return await _run(config, prepared, rank, world_size, out, say)
        except OSError as error:  # a full disk, a folder made read-only: one line, and what the folder allows
            raise UsageError(_file_error(error, out)) from None


def _file_error(error: OSError, out: Path) -> str:
    """The line for a file operation that failed during a run. Every write keeps the folder
    resumable once its configuration is written (journal lines are durable, a torn last one is
    skipped, checkpoints are atomic); before that, nothing was trained."""
    where = f": {error.filename}" if error.filename else ""
    stopped = f"stopped by a file error ({error.strerror or error}{where})"
    if (out / CONFIGURATION).is_file():
        return f"{stopped}; continue from the last checkpoint with zoruntime train --resume {out}"
    return f"{stopped} before the first step; start again with --overwrite"


@dataclass(frozen=True)
class Prepared:
    """A run checked and ready: nothing of it has been written yet. ``config`` is the run's, with
    ``--policy fit=SIZE`` replaced by the policy it chose."""

    config: TrainConfig
    model: PreTrainedModel
    tokenizer: Any
    data: Task
    start: Start
    base: dict[str, Any]
    resolved: dict[str, Any]
    runtime: Runtime


def _prepare(config: TrainConfig, device: str, world_size: int, out: Path, say: Any) -> Prepared | dict[str, Any]:
    """Load and check everything; the summary instead when a resumed run already finished."""
    resumed_base = out / "base" if config.resume and config.model is None and (out / "base").is_dir() else None
    model, tokenizer = load_model(config, resumed_base)
    data = build_data(config, tokenizer)
    fit = parse_fit(config.policy)
    if fit is not None:  # chosen once, for this model and batch; the run keeps (and resumes with) the choice
        config = replace(config, policy=fitted_policy(model, config, fit, device, world_size, data, say))
    base = base_record(config, model)
    if config.resume:
        if resumed_base is None and config.model is None:
            say(f"{out} has no copy of its base model; rebuilding the built-in one from --seed {config.seed}")
        saved = read_configuration(out)
        if saved.get("base_fingerprint") not in (None, base["base_fingerprint"]):
            raise UsageError(
                f"the base model {base['base']} is not the one {out} started from (its weights' fingerprint differs); "
                "resume with the model the run started from"
            )
    start = resume_point(config, model, out, say) if config.resume else Start()
    if start is None:
        say(f"{out}: the run already finished its {config.steps} steps; nothing to do (--steps N continues it)")
        summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
        return summary
    resolved = {**asdict(config), "device": device, "parameters": sum(p.numel() for p in model.parameters()), **base}
    if world_size > 1:
        resolved["world_size"] = world_size
    runtime = check_plan(model, config, device, world_size, start.step, data)
    say("zoruntime train " + json.dumps(resolved))
    return Prepared(config, model, tokenizer, data, start, base, resolved, runtime)


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
    replace_file(out / CONFIGURATION, [json.dumps(prepared.resolved, indent=2) + "\n"])  # a resume rewrites it


class UpdateWatch:
    """Warns once when, over ``WINDOW`` steps, the updates changed under ``THRESHOLD`` of the
    sampled weights (``StepStats.changed_fraction``): the run then learns far slower than its
    learning rate says."""

    WINDOW, THRESHOLD = 10, 0.10

    def __init__(self) -> None:
        self.recent: collections.deque[float] = collections.deque(maxlen=self.WINDOW)
        self.warned = False

    def see(self, fraction: float | None, rounding: str) -> str | None:
        if fraction is None or self.warned:
            return None
        self.recent.append(fraction)
        mean = sum(self.recent) / len(self.recent)
        if len(self.recent) < self.WINDOW or mean >= self.THRESHOLD:
            return None
        self.warned = True
        advice = (
            "16-bit masters round most ZO updates away to nearest: use --rounding stochastic (the default) or "
            "--dtype fp32"
            if rounding == "nearest"
            else "the steps are too small to move most weights: raise --lr, or train fp32 masters (--dtype fp32)"
        )
        return f"warning: in the last {self.WINDOW} steps the updates changed only {mean:.1%} of the weights; {advice}"


async def _run(
    config: TrainConfig, prepared: Prepared, rank: int, world_size: int, out: Path, say: Any
) -> dict[str, Any]:
    model, tokenizer, data, start = prepared.model, prepared.tokenizer, prepared.data, prepared.start
    runtime, base = prepared.runtime, prepared.base
    lead = rank == 0
    tokens, nonfinite, done = 0, 0, start.step
    watch = UpdateWatch()
    before = start.before
    interrupted = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread, or Windows
        loop.add_signal_handler(signal.SIGINT, interrupted.set)
    started = time.perf_counter()
    try:
        async with contextlib.AsyncExitStack() as stack:
            journal = stack.enter_context(Journal(out / "journal.jsonl", header=base)) if lead else None
            metrics = MetricsLog(out, config.log == "tensorboard", start.step) if lead else None
            if metrics is not None:
                stack.callback(metrics.close)
            rt = await stack.enter_async_context(runtime)

            async def checkpoint(reason: str = "") -> None:
                assert before is not None
                state = {"before_loss": before.loss, "before_metric": before.metric, "next_batch": done}
                try:
                    await rt.save_checkpoint(out / "checkpoints", state)
                except CheckpointError as error:
                    raise UsageError(str(error)) from None

            if before is None:
                before = await evaluate(rt, data)
                say(f"before: {before}")
                if metrics is not None:
                    metrics.dev(start.step, before.loss, before.perplexity, before.metric)
            dev_shown: dict[str, str] = {}  # the last dev figure, shown on the bar
            bar = tqdm(total=config.steps, initial=start.step, desc="train", unit="step",
                       disable=not (config.progress and lead), mininterval=0.5)  # fmt: skip
            for step in range(start.step, config.steps):
                batch = data.train_batch(step)
                stats = await rt.step(shard(batch, rank, world_size))
                if step == start.step and config.directions == "auto" and lead:
                    bar.write(f"--directions auto: {rt.directions} {config.estimator} direction(s) per step "
                              "(as many as the plan's transfers hide, predicted)")  # fmt: skip
                if journal is not None:
                    journal.append(Record.of(stats, config.eps, config.weight_decay, batch=step, rounding=rt.rounding))
                done = step + 1
                nonfinite = nonfinite + 1 if stats.skipped else 0
                if nonfinite >= config.stop_after_nonfinite:
                    bar.close()
                    kept = out / "checkpoints"
                    older = f"; the checkpoints kept in {kept} are from before" if checkpoints(kept) else ""
                    raise UsageError(
                        f"stopped at step {done}: the last {nonfinite} steps had a non-finite loss (the run diverged); "
                        f"lower --lr (it is {config.lr:g}) and start again with --overwrite{older}"
                    )
                warning = watch.see(stats.changed_fraction, rt.rounding)
                if warning and lead:
                    bar.write(warning)
                tokens += batch["input_ids"].numel()
                bar.update(1)
                rate = tokens / (time.perf_counter() - started)
                if metrics is not None:
                    metrics.train(done, stats, rate)
                bar.set_postfix(loss=f"{stats.loss:.3f}", tok_s=f"{rate:,.0f}", **dev_shown, refresh=False)
                if done < config.steps and config.eval_every and done % config.eval_every == 0:
                    evaluation = await evaluate(rt, data)  # before an interrupt's checkpoint: a resume skips it
                    dev_shown = _dev_postfix(evaluation)
                    if metrics is not None:
                        metrics.dev(done, evaluation.loss, evaluation.perplexity, evaluation.metric)
                    if lead:
                        bar.write(f"step {done}: {evaluation}")
                due = done < config.steps and config.checkpoint_every and done % config.checkpoint_every == 0
                if lead and (due or interrupted.is_set()):
                    await checkpoint()
                if interrupted.is_set():
                    bar.close()
                    raise Interrupted(
                        f"interrupted at step {done}: checkpointed; continue with zoruntime train --resume {out}"
                    )
            bar.close()
            if lead and start.step < config.steps:
                await checkpoint()  # the last step, always: a finished run can be extended or checked
            if interrupted.is_set():
                raise Interrupted(
                    f"interrupted after the last step ({config.steps}): checkpointed; write the model and the "
                    f"summary with zoruntime train --resume {out}"
                )
            after = await evaluate(rt, data)
            say(f"after:  {after}")
            if metrics is not None:
                metrics.dev(config.steps, after.loss, after.perplexity, after.metric)
            timeline = rt.timeline if config.trace else None
            skipped = rt.statistics().skipped_steps
            directions = rt.directions
            resumed_rate = metrics.resumed_tokens_per_s if metrics is not None else None
        seconds = time.perf_counter() - started
        rate = tokens / seconds if tokens else resumed_rate or 0.0  # a call that only finished the run: its rate
        if world_size > 1:
            dist.barrier()
        if not lead:
            return {}
        summary = _write_outputs(config, start, before, after, model, tokenizer, timeline, out,
                                 seconds, rate, skipped, directions)  # fmt: skip
        await asyncio.sleep(0.01)  # a Ctrl-C held back during the writes reaches its handler, not the loop's runner
        if interrupted.is_set():
            say("zoruntime train: Ctrl-C came while the outputs were written; they were finished first")
        return summary
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGINT)


def _write_outputs(
    config: TrainConfig, start: Start, before: Evaluation | None, after: Evaluation, model: PreTrainedModel,
    tokenizer: Any, timeline: Any, out: Path, seconds: float, tokens_per_s: float, skipped: int,
    directions: int | None,
) -> dict[str, Any]:  # fmt: skip
    """The finished run's model, trace and timeline (of steps this call trained), curves and
    summary, and its printed table."""
    assert before is not None
    model_dir = out / "model"
    save_model(model, tokenizer, model_dir)
    if timeline is not None and timeline.training_step_numbers:
        timeline.save_chrome_trace(out / "trace.json")
        last = timeline.training_steps_from(max(start.step, config.steps - 3))  # a few steps: readable
        last.save_png(out / "timeline.png", recorded=len(timeline.training_step_numbers))
    summary = {
        "dev_loss_before": before.loss, "dev_loss_after": after.loss,
        "perplexity_before": before.perplexity, "perplexity_after": after.perplexity,
        "metric": None, "steps": config.steps, "directions": directions, "skipped_steps": skipped,
        "seconds": seconds, "tokens_per_s": tokens_per_s, "resumed_at": start.step, "out": str(out),
    }  # fmt: skip
    for when, evaluation in (("before", before), ("after", after)):  # the task's metric under its own name
        if evaluation.metric is not None:
            name, value = evaluation.metric
            summary.update({"metric": name, f"{metric_key(name)}_{when}": value})
    save_curves(out, out / "curves.png")
    print(summary_table(summary))
    if before.loss > 0:
        drop = 1 - after.loss / before.loss
        change = f" ({abs(drop):.1%} {'lower' if drop >= 0 else 'higher'})"
    else:  # a loss of 0 (candidate scoring sure of every answer) has no relative change
        change = ""
    if not start.step:
        took = f"in {seconds:.0f} s"
    elif start.step == config.steps:
        took = f"over {config.steps} steps, all trained before this call"
    else:
        took = f"over {config.steps} steps, this call's {config.steps - start.step} in {seconds:.0f} s"
    print(f"dev loss {before.loss:.4f} -> {after.loss:.4f}{change} {took}; saved {model_dir}"
          + (f"; {skipped} step(s) skipped for a non-finite loss" if skipped else ""))  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _dev_postfix(evaluation: Evaluation) -> dict[str, str]:
    if evaluation.metric is None:
        return {"dev_loss": f"{evaluation.loss:.3f}"}
    key = metric_key(evaluation.metric[0])
    return {"dev_acc" if key == "accuracy" else f"dev_{key}": show_metric(*evaluation.metric)}


def _silent(*args: object, **kwargs: object) -> None:
    return None
