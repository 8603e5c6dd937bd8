"""A data-parallel training script for tests/test_distributed.py: run it with torchrun (several
ranks, gloo on CPU) or with plain python (one process, the whole batch), as ``dp_worker.py OUT
[opt|llama]``. Each rank writes its final weights and step statistics to OUT/rank<r>.pt."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

import zoruntime
from zoruntime.distributed import init_from_environment, shard
from zoruntime.models import random_opt, tiny_opt_config


def _model(family: str) -> torch.nn.Module:
    if family == "opt":
        return random_opt(tiny_opt_config(num_hidden_layers=3), seed=1)
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(1)  # HF's initialiser draws from the global RNG (the script's, not the package's)
    config = LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48)  # fmt: skip
    return AutoModelForCausalLM.from_config(config)


async def main(out: Path, family: str) -> None:
    rank, world, _ = init_from_environment("cpu")
    model = _model(family)
    config = zoruntime.ZOSGD(lr=1e-2, eps=1e-2, weight_decay=0.01, seed=11)
    stats = []
    async with zoruntime.Runtime(model, config, policy=zoruntime.policies.FixedDepth(1)) as rt:
        for step in range(5):
            g = torch.Generator().manual_seed(step)
            batch = {"input_ids": torch.randint(4, 260, (4, 24), generator=g)}  # the global batch
            if step == 4:  # odd rows score nothing: rank 1's shard has no token to score (its weight is 0)
                batch["labels"] = batch["input_ids"].clone()
                batch["labels"][1::2] = -100
                evaluated = await rt.evaluate(shard(batch, rank, world))
            stats.append(await rt.step(shard(batch, rank, world)))
        statistics = rt.statistics()
    result = {"weights": [p.detach().clone() for p in model.parameters()], "stats": stats, "evaluated": evaluated,
              "bytes": statistics.bytes_all_reduced, "world": statistics.world_size}  # fmt: skip
    torch.save(result, out / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    zoruntime.run(main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "opt"))
