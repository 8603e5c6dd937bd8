"""OPT shapes by name (facebook/opt-125m ... opt-175b), as configs with no weights attached, and
the widths of any supported config.

The numbers are those of the released checkpoints' config.json files: layers, hidden size,
heads, FFN width; vocabulary 50272 and 2048 positions throughout; opt-350m is the odd one
(post-layer-norm, 512-wide embeddings projected in and out).
"""

from __future__ import annotations

from transformers import OPTConfig, PretrainedConfig

from ..planning.memory import ModelDims

# name: (layers, hidden, heads)
_SHAPES = {
    "opt-125m": (12, 768, 12),
    "opt-350m": (24, 1024, 16),
    "opt-1.3b": (24, 2048, 32),
    "opt-2.7b": (32, 2560, 32),
    "opt-6.7b": (32, 4096, 32),
    "opt-13b": (40, 5120, 40),
    "opt-30b": (48, 7168, 56),
    "opt-66b": (64, 9216, 72),
    "opt-175b": (96, 12288, 96),
}

OPT_NAMES = tuple(_SHAPES)


def opt_config(name: str) -> OPTConfig:
    """The config of the released OPT model ``name`` (e.g. "opt-13b"), dropout off."""
    key = name.removeprefix("facebook/")
    if key not in _SHAPES:
        raise ValueError(f"unknown OPT shape {name!r}; known: {', '.join(OPT_NAMES)}")
    layers, hidden, heads = _SHAPES[key]
    is_350m = key == "opt-350m"
    return OPTConfig(
        vocab_size=50272,
        max_position_embeddings=2048,
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        ffn_dim=4 * hidden,
        word_embed_proj_dim=512 if is_350m else hidden,
        do_layer_norm_before=not is_350m,
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )


def shape_dims(config: PretrainedConfig) -> ModelDims:
    """The widths the planner's activation estimate needs, from the config of any family an
    adapter runs (OPT calls the feed-forward width ``ffn_dim``, the Llama family ``intermediate_size``)."""
    ffn = getattr(config, "ffn_dim", None) or config.intermediate_size
    return ModelDims(config.hidden_size, ffn, config.vocab_size, config.num_attention_heads)
