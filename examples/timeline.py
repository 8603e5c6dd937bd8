"""Save and look at a timeline: trace a few offloaded steps, write a Chrome trace and a PNG, print
the summary.

Open the JSON in https://ui.perfetto.dev or chrome://tracing; or run
``zoruntime trace summary runs/timeline/trace.json`` and ``zoruntime trace plot ... -o out.png``.

    python examples/timeline.py --out runs/timeline
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import zoruntime
from zoruntime.policies import FixedDepth


async def traced_steps(out: Path, steps: int, depth: int) -> None:
    config = zoruntime.tiny_opt_config(
        hidden_size=512, ffn_dim=2048, num_attention_heads=8, word_embed_proj_dim=512, num_hidden_layers=8
    )
    model = zoruntime.random_opt(config, seed=0)
    ids = torch.randint(4, config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    async with zoruntime.Runtime(model, zoruntime.ZOSGD(lr=1e-4), policy=FixedDepth(depth), trace=True) as rt:
        for _ in range(steps):
            await rt.step({"input_ids": ids})
    timeline = rt.timeline  # after leaving the block: the last step's offloads have finished and are in
    print(f"wrote {timeline.save_chrome_trace(out / 'trace.json')}")
    print(f"wrote {timeline.save_png(out / 'timeline.png')}")
    timeline.summary(show=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out", type=Path, default=Path("runs/timeline"), help="folder for trace.json and timeline.png"
    )
    parser.add_argument("--steps", type=int, default=3, help="traced steps (default 3)")
    parser.add_argument("--depth", type=int, default=1, help="prefetch depth (default 1: ZO2's Algorithm 1)")
    args = parser.parse_args()
    zoruntime.run(traced_steps(args.out, args.steps, args.depth))


if __name__ == "__main__":
    main()
