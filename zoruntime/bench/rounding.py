"""Do 16-bit master weights learn? Dev loss after N steps of the default task, by master dtype
and rounding, over several seeds; a table, then one JSON line.

The default task is what ``zoruntime train`` runs with no options (the built-in model on the
generated corpus), at a learning rate small enough that most updates are below half a 16-bit
step of most weights: there round-to-nearest drops them and stochastic rounding keeps them on
average. Rows: float32 masters (the yardstick), float16 and bfloat16 masters with each rounding.
Each seed draws its own model, data order and directions; a row gives the mean and spread of
the dev-loss drop, and the mean fraction of sampled weights the updates changed.

    python -m zoruntime.bench.rounding [--steps 400] [--lr 1e-5] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import torch

from .. import engine
from ..data.tokenizer import ByteTokenizer
from ..policies.base import FixedDepth
from ..train.data import build_data, evaluate
from ..train.model import load_model
from ..train.options import DTYPES, TrainConfig
from ..zo.config import ZOSGD

ROWS = (("fp32", None), ("fp16", "nearest"), ("fp16", "stochastic"), ("bf16", "nearest"), ("bf16", "stochastic"))
FP32_ROUNDING = "nearest (float32)"  # the rounding column of float32 masters (None: ZOSGD rounds fp32 to nearest)


def one_run(dtype: str, rounding: str | None, seed: int, steps: int, lr: float) -> dict[str, float]:
    """Dev loss before and after ``steps`` steps of the default task, and the mean changed fraction."""
    config = TrainConfig(dtype=dtype, seed=seed, steps=steps, lr=lr, rounding=rounding)
    model, _ = load_model(config)
    data = build_data(config, ByteTokenizer())
    optimizer = ZOSGD(lr=lr, eps=config.eps, seed=seed, rounding=rounding)

    async def go() -> dict[str, float]:
        async with engine.Runtime(model, optimizer, policy=FixedDepth(1), compute_dtype=DTYPES[dtype]) as rt:
            before = await evaluate(rt, data)
            changed = []
            for step in range(steps):
                stats = await rt.step(data.train_batch(step))
                if stats.changed_fraction is not None:
                    changed.append(stats.changed_fraction)
            after = await evaluate(rt, data)
        return {"before": before.loss, "after": after.loss, "changed": statistics.fmean(changed)}

    return engine.run(go())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated; each seeds model, data and directions")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2: a step's update is applied, and counted, during the next step")
    seeds = [int(s) for s in args.seeds.split(",")]
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
    print(f"default task, {args.steps} steps at lr {args.lr:g}, seeds {seeds}; {machine}")
    width = max(len(rounding or FP32_ROUNDING) for _, rounding in ROWS) + 2
    print(f"{'masters':<8}{'rounding':<{width}}{'dev loss after':>16}{'drop (mean ± sd)':>22}{'changed':>10}{'s':>7}")
    rows: list[dict[str, Any]] = []
    for dtype, rounding in ROWS:
        started = time.perf_counter()
        runs = [one_run(dtype, rounding, seed, args.steps, args.lr) for seed in seeds]
        drops = [r["before"] - r["after"] for r in runs]
        row = {
            "masters": dtype,
            "rounding": rounding or FP32_ROUNDING,
            "dev_loss_after": [r["after"] for r in runs],
            "drop_mean": statistics.fmean(drops),
            "drop_sd": statistics.stdev(drops) if len(drops) > 1 else 0.0,
            "changed_fraction": statistics.fmean(r["changed"] for r in runs),
            "seconds": time.perf_counter() - started,
        }
        rows.append(row)
        after = statistics.fmean(r["after"] for r in runs)
        print(f"{dtype:<8}{row['rounding']:<{width}}{after:>16.4f}{row['drop_mean']:>13.4f} ± {row['drop_sd']:.4f}"
              f"{row['changed_fraction']:>10.1%}{row['seconds']:>7.0f}")  # fmt: skip
    print(json.dumps({"steps": args.steps, "lr": args.lr, "seeds": seeds, "machine": machine, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
