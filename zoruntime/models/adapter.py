"""What the runtime needs from a model, and the choice of adapter by ``config.model_type``.

An adapter shows an unmodified HF model as a table of units over flat parameter groups and
runs each stage with parameters passed in explicitly. Everything outside ``models/`` talks to
a model through this protocol and ``adapter_for``; no other module names a model family.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from torch import nn

from ..runtime.units import UnitTable
from .batch import Batch
from .decoder import EndParams, SegmentStarter
from .groups import GroupLayout, Params
from .llama import LLAMA_LIKE, LlamaLikeAdapter
from .opt import OPTAdapter


class ModelAdapter(Protocol):
    """A model seen as units (embed, blocks, head) over groups (flat buffers), and how to run them.

    ``prepare`` returns the adapter's own per-step inputs (masks, positions): the runtime only
    passes them back to ``embed`` and ``block``."""

    @property
    def model(self) -> nn.Module:
        """The user's model, unmodified (its parameters become views of the groups' buffers)."""
        ...

    @property
    def config(self) -> Any:
        """The model's HF config (its widths, vocabulary and positions)."""
        ...

    @property
    def units(self) -> UnitTable:
        """The units in the order the forward runs them."""
        ...

    def groups(self) -> list[tuple[GroupLayout, dict[str, nn.Parameter]]]:
        """Every group's layout and the parameters it lays out, indexed by group id."""
        ...

    @property
    def vocab_names(self) -> frozenset[str]:
        """The embed_head group's parameters with a row per vocabulary entry (read in chunks)."""
        ...

    def parts(self) -> dict[str, list[nn.Parameter]]:
        """The parameters of each part a user may freeze by name: "embeddings", "head" and
        "block.N" (a tied head and the token embedding are one tensor, in both)."""
        ...

    def validate(self, batch: Batch | Mapping[str, object]) -> Batch: ...

    def prepare(self, batch: Batch, device: torch.device, dtype: torch.dtype) -> Any: ...

    def embed(self, params: EndParams, inputs: Any) -> torch.Tensor:
        """The embedding stage; vocabulary-sized parameters may come as row sources (``vocab``)."""
        ...

    def block(self, index: int, params: Params, hidden: torch.Tensor, inputs: Any) -> torch.Tensor: ...

    def layer_inputs(self, index: int, inputs: Any) -> dict[str, Any]:
        """The keyword arguments block ``index``'s layer takes in the step of ``inputs`` (masks,
        positions, rotary tables): tensors, tuples of them, or None."""
        ...

    def bound_layer(self, index: int, params: Params) -> Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]:
        """Block ``index``'s layer bound once to ``params``, tensors whose values may change between
        calls but never their memory: ``layer(hidden, layer_inputs(index, inputs))`` equals
        ``block(index, params, hidden, inputs)`` without rebinding the weights on every call."""
        ...

    def segmented_block(self, index: int, params: Params) -> SegmentStarter:
        """Block ``index``, streamed as several units, bound once to ``params`` (all of its units'):
        ``start(hidden, inputs)`` gives a forward that runs a unit at a time."""
        ...

    def head(self, params: EndParams, hidden: torch.Tensor, final: bool = False) -> torch.Tensor:
        """Every token's logits from the last block's hidden states (``final``: from the decoder's
        last state), a chunk of the vocabulary at a time."""
        ...

    def head_loss(self, params: EndParams, hidden: torch.Tensor, batch: Batch, final: bool = False) -> torch.Tensor:
        """The causal-LM loss from the last block's hidden states (``final``: from the decoder's
        last state), without materialising every token's logits nor the head's whole weight."""
        ...

    def causal_lm_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor: ...


ADAPTERS: dict[str, Callable[..., ModelAdapter]] = {
    "opt": OPTAdapter,
    **dict.fromkeys(LLAMA_LIKE, LlamaLikeAdapter),
}
"""``config.model_type`` → the adapter that runs it."""


def adapter_for(model: nn.Module, unit: str = "block") -> ModelAdapter:
    """The adapter for ``model``, chosen by its ``config.model_type``, its blocks streamed as
    ``unit`` ("block", "half" or "linear"); a clear error otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adapter = ADAPTERS.get(model_type) if isinstance(model_type, str) else None
    if adapter is None:
        supported = ", ".join(sorted(ADAPTERS))
        raise TypeError(
            f"zoruntime has no adapter for {type(model).__name__} (model_type {model_type!r}); supported model "
            f"types: {supported} (e.g. facebook/opt-125m via transformers.AutoModelForCausalLM.from_pretrained)"
        )
    return adapter(model, unit)
