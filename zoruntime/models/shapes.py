"""Model shapes by name, as configs with no weights attached: OPT (facebook/opt-125m ... opt-175b)
and Llama-family checkpoints (llama-2-7b ... qwen3-32b); and the widths of any supported config.

The numbers are those of the released checkpoints' config.json files: layers, hidden size,
heads, FFN width; vocabulary 50272 and 2048 positions throughout; opt-350m is the odd one
(post-layer-norm, 512-wide embeddings projected in and out).
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, OPTConfig, PretrainedConfig

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
    adapter runs (OPT calls the feed-forward width ``ffn_dim``, the Llama family, whose MLP is
    gated, ``intermediate_size``), and what a block's forward holds at its peak in each."""
    dims = (config.hidden_size, config.vocab_size, config.num_attention_heads)
    if getattr(config, "ffn_dim", None):  # OPT: fc1, its ReLU (not in place), beside the residual sum
        return ModelDims(dims[0], config.ffn_dim, *dims[1:], hidden_live=1, ffn_live=2)
    return ModelDims(dims[0], config.intermediate_size, *dims[1:], hidden_live=2, ffn_live=3)


_LLAMA_2 = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
_LLAMA_31 = dict(vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}, tie_word_embeddings=False)  # fmt: skip
_QWEN25 = dict(vocab_size=152064, max_position_embeddings=131072, rope_theta=1e6, use_sliding_window=False,
               tie_word_embeddings=False)  # fmt: skip
_QWEN3 = dict(vocab_size=151936, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1e6, head_dim=128,
              tie_word_embeddings=False)  # fmt: skip


def _widths(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int) -> dict[str, int]:
    return dict(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads)  # fmt: skip


LLAMA_LIKE_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-2-7b": ("llama", {**_LLAMA_2, **_widths(4096, 11008, 32, 32, 32)}),
    "llama-2-13b": ("llama", {**_LLAMA_2, **_widths(5120, 13824, 40, 40, 40)}),
    "llama-2-70b": ("llama", {**_LLAMA_2, **_widths(8192, 28672, 80, 64, 8)}),
    "llama-3.1-8b": ("llama", {**_LLAMA_31, **_widths(4096, 14336, 32, 32, 8)}),
    "llama-3.1-70b": ("llama", {**_LLAMA_31, **_widths(8192, 28672, 80, 64, 8)}),
    "mistral-7b": (
        "mistral",
        dict(
            vocab_size=32000,
            max_position_embeddings=32768,
            rms_norm_eps=1e-5,
            sliding_window=4096,
            tie_word_embeddings=False,
            **_widths(4096, 14336, 32, 32, 8),
        ),
    ),
    "qwen2.5-7b": ("qwen2", {**_QWEN25, "rms_norm_eps": 1e-6, **_widths(3584, 18944, 28, 28, 4)}),
    "qwen2.5-72b": ("qwen2", {**_QWEN25, "rms_norm_eps": 1e-5, **_widths(8192, 29568, 80, 64, 8)}),
    "qwen3-8b": ("qwen3", {**_QWEN3, **_widths(4096, 12288, 36, 32, 8)}),
    "qwen3-32b": ("qwen3", {**_QWEN3, **_widths(5120, 25600, 64, 64, 8)}),
}
"""The published config.json values that fix each checkpoint's shapes (meta-llama/Llama-2-7b-hf,
meta-llama/Llama-3.1-8B, mistralai/Mistral-7B-v0.1, Qwen/Qwen2.5-7B, Qwen/Qwen3-8B, ...)."""

MODEL_NAMES = OPT_NAMES + tuple(LLAMA_LIKE_SHAPES)


def named_config(name: str) -> PretrainedConfig:
    """The config of the released model ``name`` (an OPT name or one of ``LLAMA_LIKE_SHAPES``)."""
    key = name.rpartition("/")[2].lower()
    if key in LLAMA_LIKE_SHAPES:
        model_type, fields = LLAMA_LIKE_SHAPES[key]
        return AutoConfig.for_model(model_type, **fields)
    if key in _SHAPES:
        return opt_config(key)
    raise ValueError(f"unknown model shape {name!r}; known: {', '.join(MODEL_NAMES)}")
