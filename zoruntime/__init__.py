"""zoruntime: zeroth-order fine-tuning of models larger than the GPU, blocks streamed by an asyncio runtime.

import zoruntime
async def main():
    async with zoruntime.Runtime(model, zoruntime.ZOSGD(lr=1e-6, eps=1e-3), device="cpu",
                                 policy=zoruntime.policies.FixedDepth(2)) as rt:
        stats = await rt.step(batch)
zoruntime.run(main())
"""

from . import policies
from .engine import Runtime, RuntimeStatistics, run
from .models import Batch, OPTAdapter, random_opt, tiny_opt_config
from .runtime import TaskFailed
from .zo import ZOSGD, StepStats

__all__ = [
    "ZOSGD",
    "Batch",
    "OPTAdapter",
    "Runtime",
    "RuntimeStatistics",
    "StepStats",
    "TaskFailed",
    "policies",
    "random_opt",
    "run",
    "tiny_opt_config",
]
