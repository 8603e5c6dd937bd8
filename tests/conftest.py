"""Shared fixtures: tiny configurations covering OPT's architectural variants and a Llama-family
model (grouped-query attention, rotary positions, RMSNorm), and batches."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels (zoruntime.zo.fused) run in its interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when Triton is imported, below
from transformers import OPTConfig

from zoruntime.models import random_opt, tiny_opt_config
from zoruntime.models.init import materialize_flat, tiny_llama_config

VARIANTS = {
    # like opt-125m: layer norm before attention, final layer norm, tied head
    "pre_ln_tied": dict(vocab_size=64, hidden_size=32, ffn_dim=64, max_position_embeddings=48, word_embed_proj_dim=32),
    # like opt-350m: layer norm after attention, project_in/out, no final layer norm
    "post_ln_proj": dict(
        vocab_size=64,
        hidden_size=32,
        ffn_dim=64,
        max_position_embeddings=48,
        do_layer_norm_before=False,
        word_embed_proj_dim=16,
    ),
    "pre_ln_untied": dict(
        vocab_size=64,
        hidden_size=32,
        ffn_dim=64,
        max_position_embeddings=48,
        word_embed_proj_dim=32,
        tie_word_embeddings=False,
    ),
}


LLAMA_VARIANTS = {
    # the Llama family: 4 query heads sharing 2 key/value heads, untied head
    "llama_gqa": dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=48),
}  # fmt: skip
FAMILIES = ["pre_ln_tied", "llama_gqa"]
"""One variant per model family, for invariant tests parametrized over families."""


def variant_config(name: str, **overrides: object) -> OPTConfig:
    return tiny_opt_config(**{**VARIANTS[name], **overrides})


@pytest.fixture(params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return request.param


def token_batch(config: OPTConfig, rows: int = 3, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids with right padding in row 0 and left padding in row 1; labels -100 where padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, config.vocab_size, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, length - 4 :] = 0
    if rows > 1:
        mask[1, :3] = 0
    ids[mask == 0] = config.pad_token_id
    labels = ids.clone()
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tiny_model(name: str = "pre_ln_tied", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: object):
    """A random model of variant ``name``, drawn from ``seed`` alone."""
    if name in LLAMA_VARIANTS:
        config = tiny_llama_config(**{**LLAMA_VARIANTS[name], **overrides})
        return materialize_flat(config, lambda n, d: torch.empty(n, dtype=d), seed=seed, dtype=dtype)
    return random_opt(variant_config(name, **overrides), seed=seed, dtype=dtype)
