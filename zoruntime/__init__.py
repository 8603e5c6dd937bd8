"""zoruntime: zeroth-order fine-tuning of models larger than the GPU, blocks streamed by an asyncio runtime.

    import zoruntime
    async def main():
        async with zoruntime.Runtime(model, zoruntime.ZOSGD(lr=1e-6, eps=1e-3), device="cpu",
                                     policy=zoruntime.policies.FixedDepth(2)) as rt:
            stats = await rt.step(batch)
    zoruntime.run(main())

Names are imported on first use, so the torch-free core (``zoruntime.runtime``,
``zoruntime.policies``, ``zoruntime.testing``) loads without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import policies
    from .engine import Runtime, run
    from .models import Batch, OPTAdapter, random_opt, tiny_opt_config
    from .runtime import RuntimeStatistics, TaskFailed
    from .zo import ZOSGD, StepStats

_WHERE = {
    "Runtime": ".engine",
    "RuntimeStatistics": ".runtime",
    "run": ".engine",
    "Batch": ".models",
    "OPTAdapter": ".models",
    "random_opt": ".models",
    "tiny_opt_config": ".models",
    "TaskFailed": ".runtime",
    "ZOSGD": ".zo",
    "StepStats": ".zo",
}

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


def __getattr__(name: str) -> Any:
    if name == "policies":
        return importlib.import_module(".policies", __name__)
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module 'zoruntime' has no attribute {name!r}")
