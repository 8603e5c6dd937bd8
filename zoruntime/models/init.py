"""Random-init models built without HF's slow initialiser and without the global RNG.

The model is built on the meta device (no memory, no random draws), materialised empty and
filled from a private ``torch.Generator``: normal(0, init_std) for linear and embedding
weights (the padding row zeroed), zeros for biases, ones and zeros for layer norms, as HF
initialises OPT. Also holds the built-in tiny configurations used by tests and demos (OPT, and
a Llama for the Llama family), ``materialize_flat`` (groups born flat in pinned buffers, for
benchmarks of big shapes of any family an adapter runs) and
``load_pretrained`` (a local folder or a hub name of any family an adapter runs, with errors
that say what to do) with its inverse ``save_pretrained``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import OPTConfig, OPTForCausalLM, PretrainedConfig, PreTrainedModel

from .groups import GroupLayout


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


def tiny_llama_config(**overrides: Any) -> PretrainedConfig:
    """A 2-block Llama with grouped-query attention, on the byte vocabulary of ``tiny_opt_config``."""
    from transformers import LlamaConfig

    fields: dict[str, Any] = dict(
        vocab_size=260,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


TINY_CONFIGS: dict[str, Callable[..., PretrainedConfig]] = {"tiny": tiny_opt_config, "tiny-llama": tiny_llama_config}
"""The built-in tiny shapes by name, for CPU smoke runs of the benchmarks."""


def meta_model(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """A causal LM of any family ``config`` names, on the meta device: shapes and dtypes, no
    memory (for planning)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    nn.Module.to(model, dtype=dtype)
    return model


@torch.no_grad()
def copy_to(model: PreTrainedModel, device: torch.device | str) -> PreTrainedModel:
    """A copy of ``model`` made straight on ``device`` (no second host copy): its weights and every
    buffer, computed ones (rotary frequencies, which a state dict leaves out) included."""
    dtype = next(model.parameters()).dtype
    copy = meta_model(model.config, dtype).to_empty(device=device)
    copy.load_state_dict(model.state_dict())
    for name, buffer in model.named_buffers():
        copy.get_buffer(name).copy_(buffer)
    return copy.eval()


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


def fill_group(layout: GroupLayout, flat: torch.Tensor, generator: torch.Generator, std: float) -> torch.Tensor:
    """HF-style init of a flat group: normal(0, std) for weights that take decay, zeros for biases,
    ones for layer-norm weights (decided from the layout alone)."""
    views = layout.views(flat)
    for piece in layout.slices:
        view = views[piece.name]
        if piece.decayed:
            view.normal_(0.0, std, generator=generator)
        elif piece.name.endswith("bias"):
            view.zero_()
        else:
            view.fill_(1.0)
    return flat


def _rebuild_meta_buffers(model: PreTrainedModel) -> None:
    """Modules that hold computed buffers and no weights (rotary embeddings' frequencies) are
    built anew on the host from the config: a meta-device model has no values for them."""
    for name, module in list(model.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        if any(True for _ in module.parameters(recurse=False)):
            raise ValueError(f"{name} ({type(module).__name__}) holds both weights and computed buffers")
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, type(module)(config=model.config))


@torch.no_grad()
def materialize_flat(
    config: PretrainedConfig,
    allocate: Callable[[int, torch.dtype], torch.Tensor],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    alias_blocks: bool = False,
    fill_device: torch.device | str | None = None,
    unit: str = "block",
) -> PreTrainedModel:
    """Build a model of any family an adapter runs, its groups born flat in buffers from
    ``allocate(numel, dtype)``, one per group of a runtime streaming ``unit``s.

    No full-size intermediate model and no HF init: each group is allocated once (pinned memory
    on CUDA, so a 30B model needs its 60 GB once) and filled in place. With ``alias_blocks``
    every decoder block shares one buffer (each unit with the same unit of every other block):
    timing and GPU memory are real, the weights are not, and a 175B shape runs on a machine
    with far less host memory. With ``fill_device`` (a GPU) each group is drawn there and
    copied into its buffer: a CPU draws normals at a few hundred MB/s, so a 30B model would take
    minutes to fill on the host and takes seconds this way.
    """
    from .adapter import adapter_for

    model = meta_model(config, dtype)
    adapter = adapter_for(model, unit)
    fill_on = torch.device(fill_device) if fill_device is not None else None
    generator = torch.Generator(device=fill_on or "cpu").manual_seed(seed)
    std = float(getattr(config, "init_std", None) or config.initializer_range)  # OPT's name, then everyone else's
    replacements: dict[int, nn.Parameter] = {}
    shared: dict[tuple[str, ...], torch.Tensor] = {}  # aliased groups by their parameters' names
    for index, (layout, params) in enumerate(adapter.groups()):
        alias = alias_blocks and index > 0  # the embed/head group is never aliased
        key = tuple(p.name for p in layout.slices)
        if alias and key in shared:
            flat = shared[key]
        else:
            flat = allocate(layout.numel, layout.dtype)
            if fill_on is None:
                fill_group(layout, flat, generator, std)
            else:
                staging = torch.empty(layout.numel, dtype=layout.dtype, device=fill_on)
                flat.copy_(fill_group(layout, staging, generator, std))
            if alias:
                shared[key] = flat
        for name, view in layout.views(flat).items():
            replacements[id(params[name])] = nn.Parameter(view)  # trainable, as HF makes them
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and id(param) in replacements:
                module._parameters[name] = replacements[id(param)]
    _rebuild_meta_buffers(model)
    return model.eval()


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection within ``timeout_s`` (name lookup
    included, which can hang on a machine without network: it runs in a thread)."""
    import socket
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import TimeoutError as Timeout
    from urllib.parse import urlparse

    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"

    def connect() -> bool:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True

    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(connect).result(timeout=timeout_s)
    except (OSError, Timeout):
        return False
    finally:
        pool.shutdown(wait=False)


def _offline_options(where: str) -> dict[str, Any]:
    """For a hub name on a machine that cannot reach the hub: load from the local cache (no
    retries), or fail at once, saying what to download, when it is not cached."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(where)
    except ValueError:  # not a hub name: a local path, and loading it says what is wrong
        return {}
    if Path(where).exists() or os.environ.get("HF_HUB_OFFLINE") or hub_reachable():
        return {}

    if isinstance(try_to_load_from_cache(where, "config.json"), str):
        return {"local_files_only": True}
    raise ValueError(
        f"{where!r} is not a local folder, and the Hugging Face hub cannot be reached from here: download it first "
        f"on a machine with network (huggingface-cli download {where}) or pass the folder it is in"
    )


def save_pretrained(model: PreTrainedModel, folder: Path | str) -> None:
    """``model.save_pretrained(folder)`` of a copy of its tensors (they may be views of one flat
    group, which safetensors refuses as shared), each copied once: a tied head stays one tensor
    with the embedding and is written once, as Hugging Face writes it."""
    copies: dict[object, torch.Tensor] = {}
    state = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride()) if tensor.numel() else name
        if key not in copies:
            copies[key] = tensor.detach().clone()
        state[name] = copies[key]
    model.save_pretrained(folder, state_dict=state)


def _pretrained_config(where: str) -> tuple[Any, dict[str, Any]]:
    """The saved config of a model ``load_pretrained`` can load, and the options that load it
    (offline where the hub cannot be reached); every failure a ValueError saying what to do."""
    from transformers import AutoConfig

    from .adapter import ADAPTERS

    if where.startswith((".", "/")) and not Path(where).exists():
        raise ValueError(f"the folder {where!r} does not exist; give the folder the model was saved in")
    offline = _offline_options(where)
    try:
        config = AutoConfig.from_pretrained(where, **offline)
    except (OSError, ValueError) as error:
        kind = "a local folder without a usable config.json" if Path(where).exists() else "not a local folder"
        raise ValueError(
            f"could not load a model from {where!r} ({kind}; {type(error).__name__}). For a hub model, download "
            f"it first on a machine with network (huggingface-cli download {where}) or pass the folder it is in"
        ) from None
    if config.model_type not in ADAPTERS:
        supported = ", ".join(sorted(ADAPTERS))
        raise ValueError(f"{where!r} is a {config.model_type!r} model; zoruntime trains these model types: {supported}")
    return config, offline


def _dtype_saved_in(config: Any) -> torch.dtype:
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    return saved if isinstance(saved, torch.dtype) else getattr(torch, str(saved).removeprefix("torch."))


def saved_dtype(where: str) -> torch.dtype:
    """The dtype the model in ``where`` (a local folder or a hub name) was saved in, as its
    config.json records it (float32 where it records none), read without loading the weights;
    a ValueError as ``load_pretrained``'s where it cannot be read."""
    return _dtype_saved_in(_pretrained_config(where)[0])


def load_pretrained(where: str, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained`` on a local folder or a hub name, for a model type
    an adapter runs (``models.adapter.ADAPTERS``), in ``dtype`` (None: the dtype it was saved in);
    every failure becomes a ValueError whose message says what to do."""
    from transformers import AutoModelForCausalLM

    config, offline = _pretrained_config(where)
    try:
        model = AutoModelForCausalLM.from_pretrained(where, **offline)
    except (OSError, SafetensorError) as error:  # missing, or a damaged file
        raise ValueError(f"could not load the weights of {where!r}: {str(error).splitlines()[0]}") from None
    if dtype is None:
        dtype = _dtype_saved_in(config)
    nn.Module.to(model, dtype=dtype)
    return model.eval()
