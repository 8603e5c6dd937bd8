"""Random-init OPT models built without HF's slow initialiser and without the global RNG.

The model is built on the meta device (no memory, no random draws), materialised empty and
filled from a private ``torch.Generator``: normal(0, init_std) for linear and embedding
weights (the padding row zeroed), zeros for biases, ones and zeros for layer norms, as HF
initialises OPT. Also holds the built-in tiny configuration used by tests and demos.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import OPTConfig, OPTForCausalLM


def tiny_opt_config(**overrides: Any) -> OPTConfig:
    """A 2-block OPT small enough for CPU tests (byte-level vocabulary of 256 + 4 specials)."""
    fields: dict[str, Any] = dict(
        vocab_size=260,
        hidden_size=64,
        num_hidden_layers=2,
        ffn_dim=256,
        num_attention_heads=4,
        max_position_embeddings=128,
        word_embed_proj_dim=64,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )
    fields.update(overrides)
    return OPTConfig(**fields)


@torch.no_grad()
def random_opt(
    config: OPTConfig, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> OPTForCausalLM:
    """An ``OPTForCausalLM`` with HF-style random weights drawn from ``seed`` alone."""
    with torch.device("meta"):
        model = OPTForCausalLM(config)
    model.to_empty(device=device)
    model.tie_weights()
    generator = torch.Generator(device=device).manual_seed(seed)
    std = float(config.init_std)
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            module.weight.normal_(0.0, std, generator=generator)
            padding_idx = getattr(module, "padding_idx", None)
            if padding_idx is not None:
                module.weight[padding_idx].zero_()
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.zero_()
        if isinstance(module, nn.LayerNorm) and module.weight is not None:
            module.weight.fill_(1.0)
            module.bias.zero_()
    nn.Module.to(model, dtype=dtype)  # HF wraps .to in a decorator that type checkers misread
    return model.eval()
