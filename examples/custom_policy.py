"""Plug in your own prefetch policy: any object with ``plan(layout) -> Plan`` will do.

This one keeps the first and last blocks resident (they are the ones that cannot overlap
with a neighbour's transfer at the start and end of a step) and prefetches two blocks ahead.
It is first tried on the simulator with the H200 figures of opt-13b from DESIGN.md, then used
for real on the CPU backend.

    python examples/custom_policy.py
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune_reference import sentence_batch

import zoruntime
from zoruntime.policies import FixedDepth, ModelLayout, Plan
from zoruntime.testing import simulate


@dataclass(frozen=True)
class EndsResident:
    """Keep ``ends`` blocks resident at each end of the model; stream the rest ``depth`` ahead."""

    ends: int = 1
    depth: int = 2

    def plan(self, layout: ModelLayout) -> Plan:
        n = layout.num_units
        resident = set(range(min(self.ends, n))) | set(range(max(0, n - self.ends), n))
        return Plan(self.depth, frozenset(resident))


def what_if() -> None:
    figures = dict(upload_s=11.4e-3, compute_s=3.3e-3, offload_s=11.4e-3)  # opt-13b block, fp16, H200
    print("simulated opt-13b step (40 blocks) on an H200:")
    policies = (FixedDepth(0), FixedDepth(1), EndsResident(ends=1), EndsResident(ends=4))
    width = max(len(str(policy)) for policy in policies)
    for policy in policies:
        timeline = simulate(40, policy=policy, **figures)
        print(f"  {policy!s:<{width}} {timeline.makespan * 1e3:8.1f} ms")


async def train() -> None:
    model = zoruntime.random_opt(zoruntime.tiny_opt_config(num_hidden_layers=4), seed=0)
    async with zoruntime.Runtime(model, zoruntime.ZOSGD(lr=2e-3), policy=EndsResident()) as rt:
        print(f"resident blocks: {rt.statistics().resident_units}, streaming slots: {rt.statistics().slots}")
        for index in range(20):
            stats = await rt.step(sentence_batch(index))
        print(f"after {stats.step + 1} steps: loss {stats.loss:.3f}")


if __name__ == "__main__":
    what_if()
    zoruntime.run(train())
