"""Soak: thousands of steps with failures injected at random tasks, on the CPU backend.

A micro OPT trains through the real runtime while a seeded fraction of tasks (any kind, any
block) raise. Every failed step is retried. At the end the weights must equal, bit for bit,
those of a clean run of the same steps (any damage from a failure would show), and there must
be no leaked asyncio tasks or threads and no memory growth. Prints a table; the last line is one
JSON document.

    python -m zoruntime.bench.soak --steps 10000
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import resource
import threading
import time
import tracemalloc
from typing import Any

import torch

from ..engine import Runtime, run
from ..models.init import random_opt, tiny_opt_config
from ..policies.base import FixedDepth
from ..runtime.scheduler import TaskFailed
from ..testing import inject_faults
from ..zo.config import ZOSGD

CONFIG = tiny_opt_config(vocab_size=32, hidden_size=8, ffn_dim=16, num_attention_heads=2, word_embed_proj_dim=8,
                         num_hidden_layers=3, max_position_embeddings=8)  # fmt: skip
OPTIMIZER = ZOSGD(lr=1e-3, eps=1e-3, weight_decay=0.01, seed=5)


def _batch(step: int) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(4, 32, (2, 8), generator=torch.Generator().manual_seed(step))}


async def _train(steps: int, fault_rate: float, seed: int) -> dict[str, Any]:
    model = random_opt(CONFIG, seed=1)
    rng = random.Random(seed)
    failures = 0
    rss_mb, traced = [], []
    faults_on = [fault_rate > 0]
    async with Runtime(model, OPTIMIZER, policy=FixedDepth(1)) as rt:
        inject_faults(rt, lambda step, task: faults_on[0] and rng.random() < fault_rate)
        step = 0
        while step < steps:
            try:
                await rt.step(_batch(step))
                step += 1
            except TaskFailed:
                failures += 1
            if step % max(1, steps // 10) == 0 and step:
                gc.collect()
                rss_mb.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
                traced.append(tracemalloc.get_traced_memory()[0] / 2**20 if tracemalloc.is_tracing() else 0.0)
        faults_on[0] = False  # leave cleanly: the flush on exit applies the last update everywhere
        tasks = len(asyncio.all_tasks()) - 1
    threads = [t.name for t in threading.enumerate() if t.name.startswith("zoruntime-")]
    return {"model": model, "failures": failures, "tasks_left": tasks, "threads_left": threads,
            "rss_mb": rss_mb, "python_mb": traced}  # fmt: skip


def soak(steps: int, fault_rate: float = 0.02, seed: int = 0) -> dict[str, Any]:
    tracemalloc.start()
    started = time.perf_counter()
    faulty = run(_train(steps, fault_rate, seed))
    seconds = time.perf_counter() - started
    tracemalloc.stop()
    clean = run(_train(steps, 0.0, seed))
    same = all(
        torch.equal(a, b) for a, b in zip(faulty["model"].parameters(), clean["model"].parameters(), strict=True)
    )
    rss, py = faulty["rss_mb"], faulty["python_mb"]
    return {
        "steps": steps,
        "fault_rate": fault_rate,
        "failed_steps": faulty["failures"],
        "weights_equal_clean_run": same,
        "tasks_left": faulty["tasks_left"],
        "threads_left": faulty["threads_left"],
        "max_rss_mb_first_last": [rss[0], rss[-1]] if rss else [],
        "python_heap_mb_first_last": [py[0], py[-1]] if py else [],
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10_000, help="successful steps to reach (default 10000)")
    parser.add_argument("--fault-rate", type=float, default=0.02, help="chance that a task raises (default 0.02)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = soak(args.steps, args.fault_rate, args.seed)
    for key, value in result.items():
        print(f"{key:<28}{value}")
    print(json.dumps(result))
    ok = result["weights_equal_clean_run"] and not result["tasks_left"] and not result["threads_left"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
