"""The command line of ``zoruntime train``: its options, their defaults and their checks.

With no arguments it trains the built-in default: a small random-init OPT with a byte-level
tokenizer on a generated corpus, in about 35 s on 2 CPU cores, nothing downloaded. With
``--model`` it loads a local folder or a hub name; ``--task sst2`` uses GLUE SST-2 with MeZO's
prompt and candidate scoring; ``--task lm --text-file F`` trains a causal LM on a text file.

(The paragraph above is the ``--help`` description.) Knows the options, ``TrainConfig``, what
each option may be on its own (``check``, before anything is loaded or written) and which ones a
resume may change. Knows nothing of models, data or the runtime: it builds a policy and a
``ZOSGD`` only to check them, and reads a run folder only for its saved configuration.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..data.files import FILE_TASKS, check_template, parse_labels
from ..models.freeze import parse_freeze
from ..planning.directions import fewest_directions
from ..planning.profiles import load_profile
from ..policies.base import UNIT_KINDS, FixedDepth, MemoryBudget, Policy
from ..runs import RunFolderError, check_writable, read_configuration
from ..storage import compute_dtype_for
from ..zo.config import ZOSGD
from ..zo.estimator import estimator_for
from .watch import tensorboard_missing

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
          "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}  # fmt: skip
_DEVICE = re.compile(r"^(auto|cpu|cuda)(:(\d+))?$")
_API_WORDS = re.compile(r"(?<![-\w])(lr|eps|weight_decay|seed|rounding|directions|estimator)(=| must\b)")


class UsageError(Exception):
    """Bad input from the command line: printed as one line, exit code 2."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run depends on; printed at start and saved as ``zoruntime.json``."""

    model: str | None = None
    task: str = "lm"
    text_file: str | None = None
    data: str | None = None  # your own records (JSON Lines, CSV, Parquet, or a hub dataset) for --task
    dev: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    template: str = "{text} It was"
    labels: str | None = None
    options_field: str = "options"
    prompt_field: str = "prompt"
    target_field: str = "target"
    steps: int = 1000
    lr: float = 2e-3
    eps: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 8
    max_length: int = 64
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # or a DTYPES name; auto: the dtype the model was saved in (fp32 for the built-in)
    compute_dtype: str | None = None
    policy: str = "depth=1"
    eval_every: int = 250
    checkpoint_every: int = 250
    stop_after_nonfinite: int = 5
    trace: bool = True
    cuda_graphs: bool = False
    freeze: str | None = None
    rounding: str | None = None
    directions: int | str = 1  # or "auto"
    estimator: str = "two-sided"
    gpu_profile: str | None = None  # for --directions auto and fit=: a built-in profile or a file (default: the GPU's)
    out: str = "runs/default"
    progress: bool = True
    log: str | None = None  # "tensorboard": metrics to TensorBoard too (metrics.jsonl always)
    resume: str | None = None
    overwrite: bool = False


RESUMABLE_CHANGES = ("steps", "eval_every", "checkpoint_every", "stop_after_nonfinite", "trace", "cuda_graphs",
                     "progress", "log", "resume", "out", "overwrite")  # fmt: skip
"""Options a resumed run may change; every other one must match the run it continues."""


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, unless the help already says it ("(default ...")
    or there is none (a help that says what happens without the option)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parser(only_given: bool = False) -> argparse.ArgumentParser:
    """The option parser; ``only_given`` leaves out options not on the command line."""
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="zoruntime train",
        description=__doc__.split("\n\n")[1],
        formatter_class=_DefaultsHelp,
    )
    p.add_argument(
        "--model",
        default=d.model,
        help="local folder or hub name of an OPT or Llama-family model (llama, mistral, qwen2, "
        "qwen3); none: the built-in tiny OPT",
    )
    p.add_argument("--task", default=d.task,
                   help="lm (causal LM), sst2 (GLUE SST-2, MeZO's prompt), classify, choice or generate (on --data), "
                   "or your own: module:function or file.py:function making a zoruntime.data.tasks.Task")  # fmt: skip
    p.add_argument("--text-file", default=d.text_file, help="text to train on with --task lm; none: a generated corpus")
    p.add_argument("--data", default=d.data, help="your records: a .jsonl, .csv or .parquet file, or a hub dataset")
    p.add_argument("--dev", default=d.dev, help="dev records (default: the last tenth of --data)")
    p.add_argument("--text-field", default=d.text_field, help="the text (classify, lm) or question (choice) field")
    p.add_argument("--label-field", default=d.label_field, help="the label (classify) or answer (choice) field")
    p.add_argument("--template", default=d.template, help="classify's prompt, with {text} (default '{text} It was')")
    p.add_argument("--labels", default=d.labels,
                   help="classify's labels and the word for each, e.g. negative:terrible,positive:great")  # fmt: skip
    p.add_argument("--options-field", default=d.options_field, help="choice's list of options")
    p.add_argument("--prompt-field", default=d.prompt_field, help="generate's prompt (no loss on it)")
    p.add_argument("--target-field", default=d.target_field, help="generate's target (the loss is on it)")
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
    p.add_argument(
        "--dtype",
        default=d.dtype,
        choices=["auto", *sorted(DTYPES)],
        help="master weights' dtype; auto: the dtype the model was saved in (fp32 for the built-in)",
    )
    p.add_argument("--compute-dtype", default=d.compute_dtype, choices=sorted(DTYPES),
                   help="dtype of the forwards (default: --dtype); 16-bit with --dtype fp32: fp32 masters")  # fmt: skip
    p.add_argument(
        "--policy",
        default=d.policy,
        help="depth=K (uploads K blocks ahead), memory=SIZE (e.g. 20GB: as many blocks resident as fit; add "
        ",depth=K), or fit=SIZE (the fastest plan zoruntime plan finds within SIZE of GPU memory, chosen for the "
        "model and batch at the start and saved as the run's policy); add ,offload=N to write blocks back every N "
        "steps and ,unit=half|linear to stream finer units (e.g. depth=1,offload=4,unit=linear)",
    )
    p.add_argument(
        "--eval-every", type=int, default=d.eval_every, help="dev evaluation every N steps (0: only at the ends)"
    )
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="full checkpoint every N steps, atomically; always the last (0: only the last)")  # fmt: skip
    p.add_argument("--stop-after-nonfinite", type=int, default=d.stop_after_nonfinite,
                   help="stop when this many steps in a row have a non-finite loss (the run diverged)")  # fmt: skip
    p.add_argument(
        "--freeze",
        default=d.freeze,
        help="parts not to train: embeddings, head, blocks:A-B, comma-separated (e.g. head,blocks:0-11)",
    )
    p.add_argument(
        "--rounding",
        default=d.rounding,
        choices=("stochastic", "nearest"),
        help="how 16-bit master weights take updates (default: stochastic; fp32 masters: nearest)",
    )
    p.add_argument("--directions", type=parse_directions, default=d.directions,
                   help="directions per step (per upload of each block), or auto: as many as hide under the "
                   "transfers of the plan")  # fmt: skip
    p.add_argument("--estimator", default=d.estimator, choices=("two-sided", "one-sided"),
                   help="two-sided: 2 forwards per direction (MeZO); one-sided: 1 per direction and 1 at the weights, "
                   "the step normalised by their spread (FZOO; needs --directions 3 or more)")  # fmt: skip
    p.add_argument("--gpu-profile", default=d.gpu_profile,
                   help="for --directions auto and --policy fit=SIZE: h200, h100 or a file from zoruntime bench "
                   "--save-profile (default: the GPU's built-in profile)")  # fmt: skip
    p.add_argument("--resume", default=d.resume, help="continue the run in this --out folder from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start again in an --out folder that holds a run")
    p.add_argument(
        "--trace", action=argparse.BooleanOptionalAction, default=d.trace, help="save trace.json and timeline.png"
    )
    p.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=d.cuda_graphs,
        help="replay whole blocks' forwards from CUDA graphs (a GPU): the same bits, one launch a forward",
    )
    p.add_argument("--out", default=d.out, help="output folder; one run per folder")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d.progress, help="show a progress bar")
    p.add_argument("--log", default=d.log, choices=("tensorboard",),
                   help="metrics to TensorBoard too (OUT/tensorboard; OUT/metrics.jsonl always)")  # fmt: skip
    if only_given:
        for action in p._actions:
            action.default = argparse.SUPPRESS
    return p


def parse_directions(text: str) -> int | str:
    """A number of directions (checked by ``ZOSGD``) or "auto"."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of directions or auto") from None


def _size(text: str) -> int | None:
    match = _SIZE.match(text)
    unit = (match.group(2) or "").lower() if match else None
    return int(float(match.group(1)) * _UNITS[unit]) if match and unit in _UNITS else None


def parse_size(text: str) -> int:
    """``20GB``, ``512MB``, ``1.5GiB`` or a number of bytes."""
    size = _size(text)
    if size is None:
        raise UsageError(f"{text!r} is not a size (e.g. 24GB, 512MB, 1.5GiB)")
    return size


def parse_policy(text: str) -> Policy:
    """``depth=K`` → FixedDepth(K); ``memory=SIZE`` → MemoryBudget (SIZE: bytes, or 512MB, 20GB,
    1.5GiB; ``,depth=K`` sets its prefetch depth, 1 by default); either followed by ``,offload=N``
    (write streamed units back every N steps) and ``,unit=block|half|linear`` (stream each block
    whole, as its halves, or a unit per linear). ``policy_arg`` writes a policy back as this text."""
    main, *extras = text.split(",")
    key, _, value = main.partition("=")
    allowed = {"offload", "unit", "depth"} if key == "memory" else {"offload", "unit"}
    options: dict[str, str] = {}
    for extra in extras:
        name, _, given = extra.partition("=")
        good = {"offload": given.isdigit() and int(given or 0) >= 1, "unit": given in UNIT_KINDS,
                "depth": given.isdigit()}.get(name, False)  # fmt: skip
        if name in options or name not in allowed or not good:
            depth = " and/or depth=K (with memory=)" if key == "memory" else ""
            raise UsageError(
                f"--policy {text!r}: after the comma give offload=N with N >= 1, unit= one of "
                f"{', '.join(UNIT_KINDS)}{depth} (e.g. depth=1,offload=4,unit=linear or memory=20GB,depth=2)"
            )
        options[name] = given
    offload_every, unit = int(options.get("offload", 1)), options.get("unit", "block")
    if key == "depth" and value.isdigit():
        return FixedDepth(int(value), offload_every=offload_every, unit=unit)
    if key == "memory" and (size := _size(value)) is not None:
        return MemoryBudget(size, int(options.get("depth", 1)), offload_every=offload_every, unit=unit)
    raise UsageError(
        f"--policy {text!r} is not depth=K, memory=SIZE or fit=SIZE, optionally with ,offload=N and ,unit=U (e.g. "
        "depth=2, memory=20GB, depth=1,offload=4, depth=1,unit=linear, fit=24GB)"
    )


def parse_fit(text: str) -> int | None:
    """The GPU memory of ``fit=SIZE`` (the planner's fastest plan within SIZE, chosen once the
    model and the batch are known); None for any other policy."""
    key, _, value = text.partition("=")
    if key != "fit":
        return None
    size = _size(value)
    if size is None or size <= 0:
        raise UsageError(f"--policy {text!r}: fit= takes the GPU memory to plan within, e.g. fit=24GB or fit=600MB")
    return size


def policy_arg(policy: Policy) -> str:
    """``policy`` as ``--policy`` text (``parse_policy`` reads it back as an equal policy)."""
    extras = ""
    if getattr(policy, "offload_every", 1) != 1:
        extras += f",offload={policy.offload_every}"  # type: ignore[attr-defined]
    if getattr(policy, "unit", "block") != "block":
        extras += f",unit={policy.unit}"  # type: ignore[attr-defined]
    if isinstance(policy, FixedDepth):
        return f"depth={policy.depth}{extras}"
    if isinstance(policy, MemoryBudget):
        return f"memory={policy.budget_bytes},depth={policy.depth}{extras}"
    raise ValueError(f"{policy!r} has no --policy text: zoruntime train takes FixedDepth and MemoryBudget")


def check(config: TrainConfig) -> TrainConfig:
    """Every option on its own (before anything is loaded or written)."""
    if config.task not in ("lm", "sst2", *FILE_TASKS) and ":" not in config.task:
        raise UsageError(
            f"unknown --task {config.task!r}; choose lm, sst2, classify, choice or generate, or give "
            "module:function for a task of your own"
        )
    if config.task in FILE_TASKS and config.task != "lm" and config.data is None:
        raise UsageError(f"--task {config.task} trains on your records: give --data FILE (.jsonl, .csv, .parquet)")
    if config.data is not None and (config.task not in FILE_TASKS or config.text_file is not None):
        raise UsageError("--data goes with --task classify, choice, lm or generate (and not with --text-file)")
    if config.dev is not None and config.data is None and config.text_file is None and ":" not in config.task:
        raise UsageError("--dev goes with --data (or --text-file): the built-in corpus and sst2 bring their own dev")
    if config.labels is not None and config.task != "classify" and ":" not in config.task:
        raise UsageError(f"--labels goes with --task classify, not --task {config.task}")
    for option, where in (("--data", config.data), ("--dev", config.dev)):
        if where is not None and Path(where).is_dir():
            raise UsageError(
                f"{option} {where} is a folder; give a file (.jsonl, .csv, .parquet, .txt) or a hub dataset"
            )
        if where is not None and Path(where).suffix and not Path(where).is_file():
            raise UsageError(f"{option} {where} does not exist")
    try:
        if config.task == "classify":
            check_template(config.template)
            if config.labels is None:
                raise ValueError("--task classify needs --labels, e.g. negative:terrible,positive:great")
            parse_labels(config.labels)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if config.log == "tensorboard" and (missing := tensorboard_missing()):
        raise UsageError(missing)
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
    if parse_fit(config.policy) is None:
        parse_policy(config.policy)
    try:  # whatever the masters' dtype, so an error here never names the dtype --dtype auto finds
        optimizer(config)
        if config.freeze is not None:
            parse_freeze(config.freeze)
    except ValueError as error:
        raise UsageError(_in_flags(error)) from None
    if config.dtype != "auto":  # auto is checked once the model says its dtype (``train.model.resolve_dtype``)
        check_dtypes(config)
    if config.gpu_profile is not None:
        try:
            load_profile(config.gpu_profile)
        except ValueError as error:
            raise UsageError(str(error).replace("--gpu ", "--gpu-profile ")) from None
    if resolve_device(config.device) == "cpu" and config.cuda_graphs:
        raise UsageError("--cuda-graphs replays CUDA graphs and needs a GPU; leave it off with --device cpu")
    if config.overwrite and config.resume:
        raise UsageError("--overwrite starts a run again and --resume continues one: give one of them")
    try:
        check_writable(Path(config.out))
    except RunFolderError as error:
        raise UsageError(str(error)) from None
    return config


def check_dtypes(config: TrainConfig) -> None:
    """What the master dtype (a DTYPES name, not auto) rules out: a wider --compute-dtype, an
    --eps that rounds to 0, a rounding the masters cannot take; each a ``UsageError``."""
    try:
        compute = compute_dtype_for(
            DTYPES[config.dtype], DTYPES[config.compute_dtype] if config.compute_dtype else None
        )
    except ValueError:  # the runtime's rule, in the flags' words
        raise UsageError(
            f"--compute-dtype {config.compute_dtype} is wider than the weights (--dtype {config.dtype}): give "
            f"--dtype {config.compute_dtype} to keep {config.compute_dtype} masters, or a narrower --compute-dtype"
        ) from None
    try:
        estimator_for(config.estimator, config.eps, compute, fewest_directions(config.estimator))  # its eps, as held
    except ValueError as error:
        raise UsageError("--" + str(error).replace("a larger eps", "a larger --eps")) from None
    try:
        optimizer(config).rounding_for(DTYPES[config.dtype])
    except ValueError as error:
        raise UsageError(_in_flags(error)) from None


def _in_flags(error: ValueError) -> str:
    """A ``ZOSGD`` error in the command line's words: ``lr must ...`` → ``--lr must ...``,
    ``weight_decay=`` → ``--weight-decay ``."""
    flag = lambda m: "--" + m[1].replace("_", "-") + (" " if m[2] == "=" else m[2])  # noqa: E731
    return _API_WORDS.sub(flag, str(error))


PATH_OPTIONS = ("model", "data", "dev", "text_file", "gpu_profile", "task")
"""Options that may name a local file or folder (``task``: ``file.py:function``)."""


def absolute_path(name: str, value: Any) -> Any:
    """``value`` of option ``name`` with a local file or folder it names made absolute (a hub
    name, a built-in profile, a module stays as it is): a run records where its inputs are, so
    ``--resume`` and ``zoruntime replay`` find them from any folder."""
    if name not in PATH_OPTIONS or not isinstance(value, str):
        return value
    where, colon, function = value.rpartition(":") if name == "task" else ("", "", value)
    path = Path(function if not colon else where)
    if not path.exists():
        return value
    return f"{path.resolve()}:{function}" if colon else str(path.resolve())


def with_absolute_paths(config: TrainConfig) -> TrainConfig:
    """``config`` with every local path it names made absolute (``absolute_path``)."""
    changes: dict[str, Any] = {name: absolute_path(name, getattr(config, name)) for name in PATH_OPTIONS}
    return replace(config, **changes)


def optimizer(config: TrainConfig) -> ZOSGD:
    """The run's ZO-SGD settings."""
    return ZOSGD(lr=config.lr, eps=config.eps, weight_decay=config.weight_decay, seed=config.seed,
                 rounding=config.rounding, directions=config.directions, estimator=config.estimator)  # fmt: skip


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


def resumed_config(args: argparse.Namespace, argv: list[str] | None) -> TrainConfig:
    """The configuration of the run in ``--resume DIR``, with the changes a resume may make."""
    folder = Path(args.resume)
    saved_file = folder / "zoruntime.json"
    if not saved_file.is_file():
        raise UsageError(f"--resume {folder}: no zoruntime.json there; is it the --out folder of a run?")
    fields = set(TrainConfig.__dataclass_fields__)
    saved = {k: absolute_path(k, v) for k, v in read_configuration(folder).items() if k in fields}
    given = {k: absolute_path(k, v) for k, v in vars(parser(only_given=True).parse_args(argv)).items()}
    if "device" in given and resolve_device(given["device"]) == saved.get("device"):
        del given["device"]  # the run saved the device it resolved: --device auto names the same one
    if given.get("dtype") == "auto":
        del given["dtype"]  # the run saved the dtype its model was saved in: auto names the same one
    different = {k: (saved.get(k), v) for k, v in given.items() if k not in RESUMABLE_CHANGES and saved.get(k) != v}
    if different:
        changes = ", ".join(
            f"--{k.replace('_', '-')} {new!r} (the run used {old!r})" for k, (old, new) in different.items()
        )
        raise UsageError(f"cannot resume {folder} with a different configuration: {changes}; start a new run instead")
    keep = {k: v for k, v in given.items() if k in RESUMABLE_CHANGES}
    return TrainConfig(**{**saved, **keep, "out": str(folder), "resume": str(folder)})
