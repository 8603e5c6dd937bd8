"""What a run trains and evaluates on: the task --task names (the causal LM, SST-2, your own
records, or a task of your own) and the dev evaluation.

Knows the options, the data (``zoruntime.data``) and how to evaluate with a ``Runtime`` on each
rank's shard. Knows nothing of loading models, the run folder, checkpoints or the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from ..data.corpus import generated_corpus
from ..data.files import file_task
from ..data.lm import LMData
from ..data.sst2 import DataUnavailable, candidate_accuracy, candidate_batch, candidate_loss, load_sst2
from ..data.tasks import ExampleTask, Task, load_task_factory, show_metric
from ..distributed import causal_lm_weight, examples_in, shard
from ..engine import Runtime
from ..models.batch import LossFn
from .options import TrainConfig, UsageError


def build_data(config: TrainConfig, tokenizer: Any) -> Task:
    """The task ``config`` names, train and dev, encoded with ``tokenizer`` (a text file: its last 10% is dev)."""
    try:
        if ":" in config.task:
            factory = load_task_factory(config.task)
            try:
                task = factory(config, tokenizer)
            except ValueError as error:  # the task's own refusal: named, as every other task's is
                raise ValueError(f"--task {config.task}: {error}") from None
            if not isinstance(task, Task):
                raise ValueError(f"--task {config.task}: it returned a {type(task).__name__}, not a task (see "
                                 "zoruntime.data.tasks.Task)")  # fmt: skip
            return task
        if config.task == "sst2":
            train, dev = load_sst2(train_examples=1000, dev_examples=500, seed=config.seed)
            length = config.max_length
            return ExampleTask(train, dev, lambda examples: candidate_batch(examples, tokenizer, length),
                               config.batch_size, config.seed, candidate_loss, ("accuracy", candidate_accuracy),
                               2)  # fmt: skip
        if config.data is not None or config.text_file is not None:  # --text-file F is --task lm --data F
            return file_task(config.task, replace(config, data=config.data or config.text_file), tokenizer)
        train_text, dev_text = generated_corpus(config.seed)
        return LMData(tokenizer.encode(train_text), tokenizer.encode(dev_text), config.max_length,
                      config.batch_size, config.seed)  # fmt: skip
    except (ValueError, DataUnavailable) as error:
        raise UsageError(str(error)) from None


@dataclass(frozen=True)
class Evaluation:
    loss: float
    metric: tuple[str, float] | None = None  # the task's dev metric: its name and value

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))

    def __str__(self) -> str:
        shown = f", {self.metric[0]} {show_metric(*self.metric)}" if self.metric is not None else ""
        return f"dev loss {self.loss:.4f}, perplexity {self.perplexity:.2f}{shown}"


async def evaluate(rt: Runtime, data: Task) -> Evaluation:
    """Dev loss (and the task's metric); with several ranks each evaluates its shard of every
    batch. Batches are weighted as their means are taken: the causal-LM loss by the tokens it
    scores, a task's own loss and its metric by examples; so the figures do not depend on how
    the dev set is cut into batches."""
    batches = data.dev_batches()
    examples = [examples_in(b) for b in batches]
    scored = [int(causal_lm_weight(rt.adapter.validate(b))) for b in batches] if data.loss_fn is None else examples
    # a batch of fewer examples than ranks is evaluated whole on every rank: the ranks' weighted
    # mean of one figure is that figure
    batches = [shard(b, rt.rank, rt.world_size) if examples_in(b) >= rt.world_size else b for b in batches]
    metrics: dict[str, LossFn | None] = {"loss": None}
    if data.metric is not None:
        metrics["metric"] = data.metric[1]  # from the same forward as the loss
    try:
        values = [await rt.measure(b, metrics) for b in batches]
    except FloatingPointError:
        raise UsageError(
            f"the dev loss after step {rt.step_index} is not finite (the run diverged); lower --lr and start again "
            "with --overwrite, or --resume from a checkpoint kept from before"
        ) from None

    def mean(name: str, weights: list[int]) -> float:
        return sum(v[name] * n for v, n in zip(values, weights, strict=True)) / sum(weights)

    metric = (data.metric[0], mean("metric", examples)) if data.metric is not None else None
    return Evaluation(mean("loss", scored), metric)
