"""Tasks: what a run trains on and how it is scored, as a small protocol.

A task gives training batches by step (batch ``k`` the same whatever came before, so a resumed
run sees the same data), its dev batches, the loss (None: the causal-LM loss over the batch's
``labels``, -100 where nothing is predicted) and, optionally, a metric evaluated on dev beside
the loss. ``ExampleTask`` is the usual shape: examples built once, a function that batches a
list of them. Adding your own is a few lines (``examples/custom_task.py``) and
``zoruntime train --task module:function`` runs it: the function takes the run's
``TrainConfig`` and tokenizer and returns the task.

Knows batches and losses; nothing of models, runtimes or files.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import random
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from ..models.batch import LossFn

Metric = tuple[str, LossFn]
"""A dev metric: its name and ``fn(logits, batch)``, averaged over the dev examples."""


def metric_key(name: str) -> str:
    """A metric's name as a key in ``metrics.jsonl`` and ``summary.json`` ("exact match" → "exact_match")."""
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_") or "metric"


def show_metric(name: str, value: float) -> str:
    """A metric's value as a run prints it: an accuracy in percent, anything else as it is."""
    return f"{value:.1%}" if metric_key(name) == "accuracy" else f"{value:.4g}"


@runtime_checkable
class Task(Protocol):
    @property
    def loss_fn(self) -> LossFn | None:
        """None: the causal-LM loss over ``labels``."""
        ...

    @property
    def metric(self) -> Metric | None: ...

    @property
    def rows_per_example(self) -> int:
        """Rows of a batch per example (a candidate-scored example: one per candidate)."""
        ...

    def train_batch(self, step: int) -> dict[str, torch.Tensor]: ...

    def dev_batches(self) -> list[dict[str, torch.Tensor]]: ...


@dataclass(frozen=True)
class ExampleTask:
    """Examples built once; ``batch(examples)`` makes the tensors. Training batches draw
    ``batch_size`` examples with ``random.Random(seed, step)``; dev batches cut ``dev`` in order."""

    train: Sequence[Any]
    dev: Sequence[Any]
    batch: Callable[[Sequence[Any]], dict[str, torch.Tensor]]
    batch_size: int
    seed: int = 0
    loss_fn: LossFn | None = None
    metric: Metric | None = None
    rows_per_example: int = 1

    def __post_init__(self) -> None:
        for name, examples in (("training", self.train), ("dev", self.dev)):
            if not examples:
                raise ValueError(f"the task has no {name} examples")

    def train_batch(self, step: int) -> dict[str, torch.Tensor]:
        rng = random.Random(self.seed * 1_000_003 + step)
        return self.batch([rng.choice(self.train) for _ in range(self.batch_size)])

    def dev_batches(self) -> list[dict[str, torch.Tensor]]:
        return [self.batch(self.dev[i : i + self.batch_size]) for i in range(0, len(self.dev), self.batch_size)]


def load_task_factory(spec: str) -> Callable[..., Task]:
    """``module:function`` or ``path/to/file.py:function``: a function that makes a task."""
    where, colon, name = spec.rpartition(":")
    if not colon or not where or not name:
        raise ValueError(f"--task {spec!r}: a task of your own is module:function or file.py:function")
    try:
        if where.endswith(".py"):
            location = importlib.util.spec_from_file_location(Path(where).stem, where)
            if location is None or location.loader is None or not Path(where).is_file():
                raise ImportError(f"no file {where}")
            module = importlib.util.module_from_spec(location)
            sys.modules[location.name] = module
            location.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ImportError as error:
        raise ValueError(f"--task {spec!r}: cannot import {where} ({error})") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ValueError(f"--task {spec!r}: {where} has no function {name}")
    try:
        inspect.signature(factory).bind(None, None)
    except TypeError:
        raise ValueError(f"--task {spec!r}: {name} must take (config, tokenizer) and return a task") from None
    except ValueError:  # a builtin without a signature: the call will say
        pass
    return factory
