"""The model of a run: loading it with its tokenizer, saving it, the record of what a run started
from, and the ``Runtime`` for it with the policy and the batch checked against the model and the
free memory.

Knows the options (``TrainConfig``), the models and tokenizers zoruntime loads, the runtime's
constructor and how many rows a task's batch makes. Knows nothing of the run folder's layout (it
saves where it is told), the data itself, or the loop.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from ..data.tasks import Task
from ..data.tokenizer import ByteTokenizer
from ..engine import Runtime
from ..models.fingerprint import weights_fingerprint
from ..models.freeze import freeze
from ..models.init import load_pretrained, random_opt, save_pretrained, saved_dtype, tiny_opt_config
from ..models.shapes import shape_dims
from ..planning.directions import fewest_directions
from ..planning.memory import activation_bytes, show_size
from ..planning.planner import best, predict_memory, probe_count
from ..planning.profiles import GPUProfile, load_profile, profile_for_device
from ..policies.base import FixedDepth, Plan
from ..workloads import workloads
from .options import DTYPES, TrainConfig, UsageError, check_dtypes, optimizer, parse_policy, policy_arg

BUILT_IN = "built-in"
"""The ``base`` of a run of the built-in default model (its copy is saved in ``OUT/base``)."""


def resolve_dtype(config: TrainConfig) -> TrainConfig:
    """``config`` with ``--dtype auto`` made the dtype its model was saved in (fp32 for the
    built-in, and for a model saved in another dtype than fp32, fp16 and bf16), read from the
    model's config.json alone, then checked as a given ``--dtype`` is (``check_dtypes``)."""
    if config.dtype != "auto":
        return config
    try:
        saved = saved_dtype(config.model) if config.model is not None else torch.float32
    except ValueError as error:
        raise UsageError(str(error)) from None
    resolved = replace(config, dtype=next((name for name, d in DTYPES.items() if d == saved), "fp32"))
    try:
        check_dtypes(resolved)
    except UsageError as error:
        raise UsageError(f"{error} (--dtype auto: {resolved.dtype}, as the model was saved)") from None
    return resolved


def load_model(config: TrainConfig, base: Path | None = None) -> tuple[PreTrainedModel, Any]:
    """The model to train (``base``: the saved copy of a resumed built-in run) and its tokenizer,
    in ``config.dtype`` (auto: the dtype it was saved in)."""
    dtype = DTYPES.get(config.dtype)
    where = config.model if config.model is not None else (str(base) if base is not None else None)
    if where is None:
        return random_opt(tiny_opt_config(num_hidden_layers=4, max_position_embeddings=max(128, config.max_length)),
                          seed=config.seed, dtype=dtype or torch.float32), ByteTokenizer()  # fmt: skip
    try:
        model = load_pretrained(where, dtype)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if ByteTokenizer.saved_in(where):
        return model, ByteTokenizer()
    from transformers import AutoTokenizer

    try:
        return model, AutoTokenizer.from_pretrained(where)
    except OSError as error:
        raise UsageError(f"could not load the tokenizer of {where!r}: {str(error).splitlines()[0]}") from None


def save_model(model: PreTrainedModel, tokenizer: Any, folder: Path) -> None:
    """The model (``models.init.save_pretrained``) and the tokenizer."""
    save_pretrained(model, folder)
    tokenizer.save_pretrained(folder)


def base_record(config: TrainConfig, model: PreTrainedModel) -> dict[str, Any]:
    """What the run started from: the built-in default (copied into ``base/``) or a model's name
    or path, with a fingerprint of its weights (as loaded, in the run's dtype), the parts it
    does not train (replay leaves them alone too) and the unit its blocks were cut into (each
    unit draws its own z, so replay cuts them the same way)."""
    return {"base": config.model or BUILT_IN, "base_fingerprint": weights_fingerprint(model), "dtype": config.dtype,
            "freeze": config.freeze, "unit": getattr(parse_policy(config.policy), "unit", "block")}  # fmt: skip


def available_bytes(device: str) -> int | None:
    """Free memory where the activations live (None: unknown)."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def fitted_policy(
    model: PreTrainedModel, config: TrainConfig, gpu_bytes: int, device: str, world_size: int, task: Task, say: Any
) -> str:
    """``--policy fit=SIZE``: the fastest plan the planner finds for ``model`` and the task's
    batch within ``gpu_bytes`` (as ``zoruntime plan --gpu-memory`` would), as ``--policy`` text,
    predicted on ``--gpu-profile`` or the GPU's built-in profile."""
    profile: GPUProfile | None = None
    if config.gpu_profile is not None:
        profile = load_profile(config.gpu_profile)
    elif device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        profile = profile_for_device(name)
        if profile is None:
            raise UsageError(
                f"--policy {config.policy} predicts from a GPU profile, and the {name} has no built-in one: write one "
                "with zoruntime bench --save-profile FILE and give --gpu-profile FILE"
            )
    else:
        raise UsageError(
            f"--policy {config.policy} plans for a GPU: on {device} give --gpu-profile h200, h100 or a profile file "
            "to plan as for that GPU, or choose depth=K or memory=SIZE"
        )
    rows = -(-config.batch_size // world_size) * task.rows_per_example
    directions = config.directions if isinstance(config.directions, int) else fewest_directions(config.estimator)
    compute = DTYPES[config.compute_dtype] if config.compute_dtype else None
    works = workloads(model.config, DTYPES[config.dtype], rows, config.max_length, directions, config.estimator,
                      compute, config.cuda_graphs, auto=config.directions == "auto")  # fmt: skip
    with ThreadPoolExecutor(max_workers=1) as planner:  # its simulator runs an event loop, and train's is running
        found = planner.submit(best, list(works.values()), profile, gpu_bytes).result()
    if found is None or found.chosen is None:
        least = min(predict_memory(work, Plan(0), profile) for work in works.values())
        raise UsageError(
            f"--policy {config.policy}: nothing fits in {show_size(gpu_bytes)} at --batch-size {config.batch_size} "
            f"x --max-length {config.max_length}; the least any plan needs is {show_size(least)} (depth 0, "
            "the finest units): give more, or a smaller batch"
        )
    say(f"--policy {config.policy}: {found.policy}, predicted on the {profile.name} profile to take "
        f"{show_size(found.gpu_bytes)} and {found.step_s:.3f} s a step, paced by {found.bound_by}")  # fmt: skip
    return policy_arg(found.chosen)


def check_plan(
    model: PreTrainedModel, config: TrainConfig, device: str, world_size: int, start_step: int, task: Task
) -> Runtime:
    """The runtime for ``model`` and ``task``'s loss, with the policy checked against the model and
    the batch against memory."""
    compute = DTYPES[config.compute_dtype] if config.compute_dtype else None
    policy = parse_policy(config.policy)
    positions = model.config.max_position_embeddings
    if config.max_length > positions:  # a batch as long would be refused at whichever step first made one
        raise UsageError(
            f"--max-length {config.max_length} is longer than the model's {positions} positions; give --max-length "
            f"{positions} or less"
        )
    blocks = model.config.num_hidden_layers
    if isinstance(policy, FixedDepth) and policy.depth >= blocks:
        raise UsageError(
            f"--policy {config.policy}: the model has {blocks} blocks, so at most {blocks - 1} uploads can run "
            f"ahead; use depth=1 to {blocks - 1} (or memory=SIZE to keep blocks resident)"
        )
    if config.freeze is not None:
        try:
            freeze(model, config.freeze)
        except ValueError as error:
            raise UsageError(str(error)) from None
    try:
        runtime = Runtime(model, optimizer(config), device=device, policy=policy, compute_dtype=compute,
                          trace=config.trace, loss_fn=task.loss_fn, start_step=start_step,
                          profile=config.gpu_profile, cuda_graphs=config.cuda_graphs)  # fmt: skip
    except ValueError as error:
        raise UsageError(f"--policy {config.policy}: {error}") from None
    rows = -(-config.batch_size // world_size) * task.rows_per_example  # a candidate-scored task: a row per candidate
    dims = shape_dims(model.config)
    directions = config.directions if isinstance(config.directions, int) else fewest_directions(config.estimator)
    need = activation_bytes(dims, rows, config.max_length, runtime.compute_dtype.itemsize, attention_scores=True,
                            chunked_loss=task.loss_fn is None,
                            probes=probe_count(config.estimator, directions))  # fmt: skip
    free = available_bytes(device)
    if free is not None and need > 0.8 * free:
        raise UsageError(
            f"--batch-size {config.batch_size} x --max-length {config.max_length} needs about {need / 1e9:.1f} GB of "
            f"working memory on {device}, and {free / 1e9:.1f} GB is free; lower --batch-size or --max-length"
        )
    check_batches(runtime, config, task)
    return runtime


def check_batches(runtime: Runtime, config: TrainConfig, task: Task) -> None:
    """The task's first training batch and first dev batch through the runtime's own checks (and,
    for the causal-LM loss, that each has a token to score), before anything is written: a task
    whose batches the runtime refuses would otherwise stop the run after its folder was made."""
    refusals = (ValueError, TypeError, KeyError, IndexError, ZeroDivisionError)

    def first_dev() -> Any:
        batches = task.dev_batches()
        if not batches:
            raise ValueError("it has none (give the task dev data)")
        return batches[0]

    for which, make in (("training batch 0", lambda: task.train_batch(0)), ("first dev batch", first_dev)):
        try:
            validated = runtime.adapter.validate(make())
            if task.loss_fn is None:
                validated.check_scored()
        except refusals as error:
            message = str(error).replace("max_length=", "--max-length ")
            raise UsageError(f"--task {config.task}, its {which}: {message}") from None
