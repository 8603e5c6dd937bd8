"""The causal-LM loss in pieces, shared by every adapter: never the logits of every token at
once, nor their float32 copies.

Knows next-token targets and cross-entropy; the adapter supplies its LM head. Knows nothing
about model families.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..planning.memory import LOSS_CHUNK_TOKENS
from .batch import IGNORE_INDEX, Batch


def loss_in_pieces(
    logits_of: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, batch: Batch
) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != -100 from the decoder's last hidden state
    ``hidden`` [B, T, H]: ``logits_of`` (the LM head) and a float32 cross-entropy run on
    ``LOSS_CHUNK_TOKENS`` tokens at a time, summed, then divided by the number of predicted
    tokens. Equal to HF's loss within float rounding (the sum runs in another order)."""
    # next-token targets: labels shifted left by one, -100 after each row's last token
    targets = torch.nn.functional.pad(batch.labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, flat.shape[0], LOSS_CHUNK_TOKENS):
        logits = logits_of(flat[start : start + LOSS_CHUNK_TOKENS]).float()
        chunk = targets[start : start + LOSS_CHUNK_TOKENS]
        total = total + torch.nn.functional.cross_entropy(logits, chunk, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum()
