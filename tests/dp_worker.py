"""A data-parallel training script for tests/test_distributed.py: run it with torchrun (several
ranks, gloo on CPU) or with plain python (one process, the whole batch). Each rank writes its
final weights and step statistics to OUT/rank<r>.pt."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

import zoruntime
from zoruntime.distributed import init_from_environment, shard
from zoruntime.models import random_opt, tiny_opt_config


async def main(out: Path) -> None:
    rank, world, _ = init_from_environment("cpu")
    model = random_opt(tiny_opt_config(num_hidden_layers=3), seed=1)
    config = zoruntime.ZOSGD(lr=1e-2, eps=1e-2, weight_decay=0.01, seed=11)
    stats = []
    async with zoruntime.Runtime(model, config, policy=zoruntime.policies.FixedDepth(1)) as rt:
        for step in range(5):
            g = torch.Generator().manual_seed(step)
            batch = {"input_ids": torch.randint(4, 260, (4, 24), generator=g)}  # the global batch
            stats.append(await rt.step(shard(batch, rank, world)))
        statistics = rt.statistics()
    result = {"weights": [p.detach().clone() for p in model.parameters()], "stats": stats,
              "bytes": statistics.bytes_all_reduced, "world": statistics.world_size}  # fmt: skip
    torch.save(result, out / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    zoruntime.run(main(Path(sys.argv[1])))
