"""A task of your own in a few lines: counting. Each example is "n n+1 n+2 ..." and the model
learns to continue it; the loss is the causal LM's (``loss_fn`` None), so only examples and a
batch function are needed. ``zoruntime train`` runs it by name:

    zoruntime train --task examples/custom_task.py:make --steps 200 --out runs/counting

or, as here, ``python examples/custom_task.py`` runs that command with a short run.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from zoruntime.data.tasks import ExampleTask


def make(config: Any, tokenizer: Any) -> ExampleTask:
    """The task ``zoruntime train --task examples/custom_task.py:make`` builds (config: the run's
    options; tokenizer: the model's)."""
    rows = [tokenizer.encode(" ".join(f"{n + k:03d}" for k in range(12))) for n in range(500)]
    width = min(config.max_length, min(len(r) for r in rows))

    def batch(examples: list[list[int]]) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([r[:width] for r in examples])}

    return ExampleTask(rows[:450], rows[450:], batch, config.batch_size, config.seed)


if __name__ == "__main__":
    from zoruntime.train import main

    out = sys.argv[1] if len(sys.argv) > 1 else "runs/custom_task"
    raise SystemExit(main(["--task", f"{__file__}:make", "--steps", "60", "--eval-every", "20", "--no-trace",
                           "--no-progress", "--out", out, "--overwrite"]))  # fmt: skip
