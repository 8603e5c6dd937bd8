"""Do several directions per step pay? Steps and simulated opt-13b time to a fixed dev loss, by
number of directions q and estimator, over several seeds; a table, then one JSON line.

The cost that counts for a model streamed over PCIe is the upload, one per block and step, not
the forward: extra directions use the compute lane while the next block crosses the link. So
the measure is steps to a dev loss, and the step time of opt-13b for each q as the planner
predicts it (fp16 on the H200 profile, batch 1 x 2048, ``FixedDepth(1)``: every block streamed;
either rounding: on a GPU a 16-bit update is one kernel whichever). The learning is measured on this machine with the
built-in model; the step times are predictions, not measurements.

Two tasks, both generated: ``default`` is what ``zoruntime train`` runs with no options (a
causal LM on the generated corpus); ``subject`` is a generated question: a sentence of the
corpus, then "Subject:", and the loss on the answer alone ("animal" or "person", by the
sentence's subject). For each task, estimator and q, each learning rate of the estimator's
grid runs on the first seed and the one with the lowest final dev loss runs on the others (a
run whose dev loss stops being finite has diverged: its final loss counts as infinite). The
target is the dev loss one two-sided direction (MeZO) reaches on every seed within the steps
(the highest of its seeds' final dev losses, at its chosen rate); a row reports the steps each
seed took to reach it (dev loss every ``--eval-every`` steps), their mean over the seeds that
reached it, the forwards that took (one per probe and step), and that mean times the predicted
opt-13b step time.

    python -m zoruntime.bench.directions [--steps 200] [--seeds 0,1,2] [--directions 1,2,4,8]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch

from .. import engine
from ..data.corpus import sentences
from ..data.sst2 import padded
from ..data.tasks import ExampleTask, Task
from ..data.tokenizer import ByteTokenizer
from ..models.adapter import adapter_for
from ..models.init import meta_model
from ..models.shapes import named_config, shape_dims
from ..planning.directions import fewest_directions
from ..planning.planner import Workload, predict, probe_count
from ..planning.profiles import BUILT_IN
from ..policies.base import FixedDepth
from ..storage import model_layout
from ..train.data import build_data, evaluate
from ..train.model import load_model
from ..train.options import TrainConfig, UsageError
from ..zo.config import ZOSGD

LR_GRIDS = {"two-sided": (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2), "one-sided": (2.5e-3, 5e-3, 1e-2, 2e-2, 4e-2)}
"""Learning rates tried per estimator: 2e-3 is ``zoruntime train``'s default (one two-sided
direction); the one-sided step is normalised (its size does not scale with g, about 5 on the
default task), so its rates are larger."""

ANIMALS = ("the cat", "a small dog", "the bird")


def subject_task(seed: int, batch_size: int, max_length: int) -> Task:
    """The generated question: ``<sentence> Subject:`` then `` animal.`` or `` person.`` (loss on it alone)."""
    tokenizer = ByteTokenizer()

    def rows(texts: list[str]) -> list[tuple[list[int], list[int]]]:
        made = []
        for text in texts:
            if text.startswith("our team"):
                continue
            answer = " animal." if text.startswith(ANIMALS) else " person."
            head = tokenizer.encode(f"{text} Subject:", add_special_tokens=True)[-(max_length - len(answer)) :]
            tail = tokenizer.encode(answer, add_special_tokens=False)
            made.append((head + tail, [-100] * len(head) + tail))
        return made

    train, dev = rows(sentences(2 * seed, 4000)), rows(sentences(2 * seed + 1, 64))
    return ExampleTask(train, dev, lambda batch: padded(batch, tokenizer.pad_token_id), batch_size, seed)


@dataclass(frozen=True)
class Run:
    curve: list[tuple[int, float]]  # (steps done, dev loss)
    seconds: float

    @property
    def final(self) -> float:
        return self.curve[-1][1]

    def steps_to(self, target: float) -> int | None:
        return next((step for step, loss in self.curve[1:] if loss <= target), None)


def one_run(task: str, estimator: str, q: int, lr: float, seed: int, steps: int, eval_every: int) -> Run:
    config = TrainConfig(seed=seed, steps=steps, lr=lr)
    model, _ = load_model(config)
    data = (build_data(config, ByteTokenizer()) if task == "default"
            else subject_task(seed, config.batch_size, config.max_length))  # fmt: skip
    optimizer = ZOSGD(lr=lr, eps=config.eps, seed=seed, directions=q, estimator=estimator)

    async def go() -> Run:
        started = time.perf_counter()
        async with engine.Runtime(model, optimizer, policy=FixedDepth(1)) as rt:
            curve = [(0, (await evaluate(rt, data)).loss)]
            for step in range(steps):
                await rt.step(data.train_batch(step))
                if (step + 1) % eval_every == 0 or step + 1 == steps:
                    try:
                        curve.append((step + 1, (await evaluate(rt, data)).loss))
                    except UsageError:  # diverged: the dev loss is not finite, and stays so
                        curve.append((step + 1, math.inf))
                        break
        return Run(curve, time.perf_counter() - started)

    return engine.run(go())


@functools.cache
def opt13b_step_s(estimator: str, q: int) -> float:
    """The planner's step time of opt-13b fp16 on the H200 profile, batch 1 x 2048, every block streamed."""
    config = named_config("opt-13b")
    layout = model_layout(adapter_for(meta_model(config, torch.float16)), torch.float16, several_directions=q > 1)
    work = Workload(layout, shape_dims(config), 1, 2048, "block", config.num_hidden_layers, q, estimator)
    return predict(work, BUILT_IN["h200"], FixedDepth(1)).step_s


def settings(directions: list[int]) -> list[tuple[str, int]]:
    """(estimator, q) rows, each estimator from its fewest directions."""
    return [(e, q) for e in ("two-sided", "one-sided") for q in directions if q >= fewest_directions(e)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated; each seeds model, data and directions")
    parser.add_argument("--directions", default="1,2,4,8")
    parser.add_argument("--tasks", default="default,subject")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    directions = [int(q) for q in args.directions.split(",")]
    if 1 not in directions:
        parser.error("--directions must include 1: the target is what one two-sided direction reaches")
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"{args.steps} steps, dev loss every {args.eval_every}, seeds {seeds}; learning on {machine}; "
          "opt-13b step times predicted (H200 profile, fp16, batch 1 x 2048, FixedDepth(1))")  # fmt: skip
    base_s = opt13b_step_s("two-sided", 1)
    rows: list[dict[str, Any]] = []
    for task in args.tasks.split(","):
        chosen: dict[tuple[str, int], tuple[float, list[Run]]] = {}
        for estimator, q in settings(directions):
            tried = {lr: one_run(task, estimator, q, lr, seeds[0], args.steps, args.eval_every)
                     for lr in LR_GRIDS[estimator]}  # fmt: skip
            lr = min(tried, key=lambda rate: tried[rate].final)
            runs = [tried[lr]] + [one_run(task, estimator, q, lr, s, args.steps, args.eval_every) for s in seeds[1:]]
            chosen[(estimator, q)] = (lr, runs)
        target = max(r.final for r in chosen[("two-sided", 1)][1])
        print(f"\ntask {task}: target dev loss {target:.4f} (what one two-sided direction reaches on every seed in "
              f"{args.steps} steps)")  # fmt: skip
        print(f"{'estimator':<11}{'q':>3}{'lr':>9}{'final dev (mean)':>18}{'steps to target':>18}{'reached':>9}"
              f"{'fewer':>7}{'forwards':>10}{'13b step s':>12}{'x q=1':>7}"
              f"{'13b s to target':>17}")  # fmt: skip
        reference_steps = None
        for (estimator, q), (lr, runs) in chosen.items():
            reached = [s for s in (r.steps_to(target) for r in runs) if s is not None]
            mean_steps = statistics.fmean(reached) if reached else None
            if (estimator, q) == ("two-sided", 1):
                reference_steps = mean_steps
            step_s = opt13b_step_s(estimator, q)
            fewer = reference_steps / mean_steps if reference_steps and mean_steps else None
            row = {
                "task": task, "estimator": estimator, "directions": q, "lr": lr, "target": target,
                "final_dev_loss": [r.final for r in runs], "steps_to_target": [r.steps_to(target) for r in runs],
                "mean_steps_to_target": mean_steps, "fewer_steps_than_q1": fewer,
                "forwards_to_target": mean_steps * probe_count(estimator, q) if mean_steps else None,
                "opt13b_step_s": step_s, "opt13b_step_vs_q1": step_s / base_s,
                "opt13b_s_to_target": mean_steps * step_s if mean_steps else None,
                "seconds": sum(r.seconds for r in runs), "curves": [r.curve for r in runs],
            }  # fmt: skip
            rows.append(row)
            per_seed = ", ".join("-" if s is None else str(s) for s in row["steps_to_target"])
            to_target = f"{mean_steps * step_s:.0f}" if mean_steps else "-"
            forwards = f"{row['forwards_to_target']:.0f}" if mean_steps else "-"
            print(f"{estimator:<11}{q:>3}{lr:>9.1e}{statistics.fmean(row['final_dev_loss']):>18.4f}"
                  f"{per_seed:>18}{len(reached):>7}/{len(runs)}{(f'{fewer:.2f}x' if fewer else '-'):>7}{forwards:>10}"
                  f"{step_s:>12.3f}{step_s / base_s:>6.2f}x{to_target:>17}")  # fmt: skip
    print(json.dumps({"steps": args.steps, "eval_every": args.eval_every, "seeds": seeds, "machine": machine,
                      "lr_grids": LR_GRIDS, "rows": rows}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
