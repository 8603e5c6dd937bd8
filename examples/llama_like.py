"""A Llama-family model through the same runtime: a small random Llama-3-style model (grouped-query
attention, RMSNorm, rotary positions), bfloat16 master weights that take updates by stochastic
rounding, its token embedding frozen. Swap in ``AutoModelForCausalLM.from_pretrained(...)`` of a
Llama, Mistral, Qwen2 or Qwen3 checkpoint and nothing else changes.

    python examples/llama_like.py --steps 200
"""

from __future__ import annotations

import argparse

import torch
from finetune_reference import sentence_batch  # the same generated sentences (byte-level ids)
from transformers import AutoModelForCausalLM, LlamaConfig

import zoruntime
from zoruntime.policies import FixedDepth


async def train(steps: int, lr: float) -> tuple[float, float]:
    torch.manual_seed(0)  # HF's initialiser draws from the global RNG; zoruntime itself never touches it
    config = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    model.model.embed_tokens.weight.requires_grad_(False)  # frozen: neither perturbed nor updated
    dev = sentence_batch(-1)
    async with zoruntime.Runtime(model, zoruntime.ZOSGD(lr=lr, eps=1e-2), policy=FixedDepth(1)) as rt:
        before = await rt.evaluate(dev)
        print(f"dev loss before: {before:.3f}  ({rt.adapter.__class__.__name__}, {rt.rounding} rounding)")
        for step in range(steps):
            stats = await rt.step(sentence_batch(step))
            if (step + 1) % 50 == 0:
                print(f"step {step + 1:4d}  loss {stats.loss:.3f}  updated weights {stats.changed_fraction:.0%}")
        after = await rt.evaluate(dev)
        print(f"dev loss after:  {after:.3f}")
    return before, after


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="ZO steps (default 200)")
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate (default 2e-3)")
    args = parser.parse_args()
    zoruntime.run(train(args.steps, args.lr))


if __name__ == "__main__":
    main()
