"""A fingerprint of a model's weights: tells "the base this run started from" apart from another
model or from the same model after fine-tuning, without hashing hundreds of GB.

SHA-256 over every parameter's name, shape and dtype and a fixed sample of its values (all of
them up to ``SAMPLE`` elements, else ``SAMPLE`` evenly strided ones, which a fine-tune moves
too). Tied parameters count once. Knows nothing about runs or journals.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

SAMPLE = 1 << 16


@torch.no_grad()
def weights_fingerprint(model: nn.Module) -> str:
    digest = hashlib.sha256()
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        flat = param.detach().reshape(-1)
        if flat.numel() > SAMPLE:
            flat = flat[:: flat.numel() // SAMPLE][:SAMPLE]
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|".encode())
        digest.update(flat.to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]
