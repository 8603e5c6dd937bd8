"""An async training loop written by hand: ``await rt.step(batch)`` inside your own coroutine.

The runtime streams the tiny OPT's blocks through the compute side (here: the CPU backend's
separate buffers and worker-thread lanes) with Algorithm 1 (prefetch depth 1); your code
stays free to await other things between steps (data loading, logging, a web server...).

    python examples/async_training_loop.py --steps 300
"""

from __future__ import annotations

import argparse
import asyncio

from finetune_reference import sentence_batch  # the same generated sentences

import zoruntime
from zoruntime.policies import FixedDepth


async def batches(count: int):
    """A stand-in for an async data pipeline."""
    for index in range(count):
        await asyncio.sleep(0)
        yield sentence_batch(index)


async def train(steps: int, lr: float) -> tuple[float, float]:
    model = zoruntime.random_opt(zoruntime.tiny_opt_config(), seed=0)
    dev = sentence_batch(-1)
    async with zoruntime.Runtime(model, zoruntime.ZOSGD(lr=lr, eps=1e-3), policy=FixedDepth(1)) as rt:
        before = await rt.evaluate(dev)
        print(f"dev loss before: {before:.3f}")
        async for batch in batches(steps):
            stats = await rt.step(batch)
            if (stats.step + 1) % 50 == 0:
                print(f"step {stats.step + 1:4d}  loss {stats.loss:.3f}  g {stats.projected_grads[0]:+.3f}")
        after = await rt.evaluate(dev)
        print(f"dev loss after:  {after:.3f}")
    return before, after  # leaving the `async with` wrote the trained weights into `model`


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="ZO steps (default 300)")
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate (default 2e-3)")
    args = parser.parse_args()
    zoruntime.run(train(args.steps, args.lr))


if __name__ == "__main__":
    main()
