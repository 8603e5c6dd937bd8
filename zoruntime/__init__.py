"""zoruntime: zeroth-order fine-tuning of models larger than the GPU, blocks streamed by an asyncio runtime."""

from .models import Batch, OPTAdapter, random_opt, tiny_opt_config
from .zo import ZOSGD, StepStats

__all__ = ["ZOSGD", "Batch", "OPTAdapter", "StepStats", "random_opt", "tiny_opt_config"]
