"""The Llama-family adapter: decoder-only models built as HF's Llama is (token embedding, rotary
positions, decoder layers of RMSNorm, attention with grouped-query heads and a gated MLP, a
final RMSNorm, an LM head), run through HF's own modules, never a copied forward.

Covers ``LlamaForCausalLM`` (Llama 2, Llama 3.x with its rope scaling), ``MistralForCausalLM``
(a sliding window on every layer), ``Qwen2ForCausalLM`` (a sliding window on the layers
``config.layer_types`` names) and ``Qwen3ForCausalLM`` (q/k norms inside attention), tied or
untied heads; and, with no code of their own, the further families ``FURTHER_FAMILIES`` lists,
each admitted because its stages equal HF's forward bitwise with its distinctive settings on
(``tests/test_llama_adapter.py``). A family whose model forward does more than embed, run the
layers, norm and project (Granite's multipliers, Cohere's logit scale, Gemma 2's soft-capping)
is not one of them. Rotary embeddings are computed once per step in the embed stage and passed to
every block; each layer gets the mask of its attention type, built as HF builds it. Knows these
families' module names; knows nothing about ZO, devices or scheduling.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .batch import Batch, make_batch
from .decoder import DecoderLayout, EndParams, SegmentStarter
from .groups import GroupLayout, Params
from .segments import bind_layer, bound_layer_call
from .vocab import TokenLookup

FURTHER_FAMILIES = (
    "apertus", "arcee", "ernie4_5", "exaone4", "gemma", "glm", "glm4", "helium", "nemotron", "olmo", "olmo2",
    "phi3", "seed_oss", "smollm3", "stablelm", "starcoder2",  # dense
    "ernie4_5_moe", "glm4_moe", "gpt_oss", "jetmoe", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe",  # mixture of experts
)  # fmt: skip
"""Families built as Llama is, down to the module names, whose differences (partial rotary, parallel
residuals, q/k/v clipping, no-rope layers, attention sinks, experts) live inside HF's own layers."""

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", *FURTHER_FAMILIES)
"""``config.model_type`` values this adapter runs."""

_NO_CACHE = {"cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values": None}
_MASKS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}


@dataclass(slots=True)
class StageInputs:
    """What every stage of one step shares: the batch, positions, one mask per attention type,
    and the rotary embeddings (filled in by the embed stage, once per step)."""

    batch: Batch
    position_ids: torch.Tensor  # [1, T] long: HF's forward numbers positions 0 … T − 1
    masks: dict[str, torch.Tensor | None]
    tokens: TokenLookup  # the batch's tokens as the embedding's chunks see them
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None


def _decayed(module: nn.Module, local_name: str) -> bool:
    return "norm" not in type(module).__name__.lower() and not local_name.endswith("bias")


def _layer_types(config: Any) -> list[str]:
    """Each layer's attention type, as the HF model picks its mask."""
    count = config.num_hidden_layers
    types = getattr(config, "layer_types", None)
    if types:
        return list(types[:count])
    return ["sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"] * count


class LlamaLikeAdapter:
    """Stages of a Llama-family causal LM. The model is put in eval mode; its parameters'
    ``requires_grad`` flags are left as the user set them."""

    def __init__(self, model: nn.Module, unit: str = "block") -> None:
        config: Any = getattr(model, "config", None)
        if getattr(config, "model_type", None) not in LLAMA_LIKE:
            raise TypeError(f"LlamaLikeAdapter runs {', '.join(LLAMA_LIKE)} models; got {type(model).__name__}")
        model.eval()
        self.model: Any = model  # a HF *ForCausalLM: its submodules are attributes mypy cannot see
        self.config = config
        base: Any = self.model.model
        self.blocks: list[nn.Module] = list(base.layers)
        self._rotary: Any = base.rotary_emb
        self._layer_types = _layer_types(config)
        unknown = sorted(set(self._layer_types) - set(_MASKS))
        if unknown:
            raise ValueError(f"{type(model).__name__}: attention types {unknown} are not supported (full or sliding)")
        self._ends_modules: dict[str, Any] = {"embed_tokens": base.embed_tokens, "norm": base.norm,
                                              "lm_head": self.model.lm_head}  # fmt: skip
        self.layout = DecoderLayout(self._ends_modules, self.blocks, _decayed, unit, self._trace)
        self.embed_head_layout, self.block_layouts = self.layout.embed_head_layout, self.layout.block_layouts
        self.vocab_names = self.layout.vocab_names
        self.units = self.layout.units

    # -- shape facts ------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def tied(self) -> bool:
        return self.model.lm_head.weight is self._ends_modules["embed_tokens"].weight

    def groups(self) -> list[tuple[GroupLayout, dict[str, nn.Parameter]]]:
        return self.layout.groups()

    def parts(self) -> dict[str, list[nn.Parameter]]:
        """ "embeddings" (the token embedding), "head" (final norm, LM head) and "block.N"."""
        embeddings = list(self._ends_modules["embed_tokens"].parameters())
        head = [*self._ends_modules["norm"].parameters(), *self._ends_modules["lm_head"].parameters()]
        return {"embeddings": embeddings, "head": head} | {
            f"block.{i}": list(block.parameters()) for i, block in enumerate(self.blocks)
        }

    # -- inputs -------------------------------------------------------------------------------
    def validate(self, batch: Batch | Mapping[str, object]) -> Batch:
        return make_batch(batch, vocab_size=self.config.vocab_size, max_positions=self.config.max_position_embeddings)

    def prepare(self, batch: Batch, device: torch.device, dtype: torch.dtype) -> StageInputs:
        """Positions and each attention type's mask, built where the batch is (HF's mask builders
        inspect the mask's values, which on a GPU would stall the host), then moved to ``device``."""
        ids = batch.input_ids
        position_ids = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        probe = torch.empty((ids.shape[0], ids.shape[1], 0), dtype=dtype, device=ids.device)
        kwargs = {"config": self.config, "inputs_embeds": probe, "attention_mask": batch.attention_mask,
                  "position_ids": position_ids, **_NO_CACHE}  # fmt: skip
        masks = {kind: _MASKS[kind](**kwargs) for kind in sorted(set(self._layer_types))}
        moved = {k: None if m is None else m.to(device, non_blocking=True) for k, m in masks.items()}
        tokens = TokenLookup.of(ids, *self._ends_modules["embed_tokens"].weight.shape).to(device)
        return StageInputs(batch.to(device), position_ids.to(device, non_blocking=True), moved, tokens)

    # -- stages -------------------------------------------------------------------------------
    def _call(self, key: str, params: EndParams, *args: object) -> torch.Tensor:
        return self.layout.call_end(key, params, *args)

    def embed(self, params: EndParams, inputs: StageInputs) -> torch.Tensor:
        """Token embeddings [B, T, H]; the rotary embeddings, once per step, into ``inputs``."""
        hidden = self.layout.embed_tokens(params, inputs.batch.input_ids, inputs.tokens)
        if inputs.position_embeddings is None:
            inputs.position_embeddings = self._rotary(hidden, inputs.position_ids)
        return hidden

    def layer_inputs(self, index: int, inputs: StageInputs) -> dict[str, Any]:
        """The keyword arguments layer ``index`` takes in this step: its attention type's mask,
        the position ids and the rotary tables."""
        return {"attention_mask": inputs.masks[self._layer_types[index]], "position_ids": inputs.position_ids,
                "position_embeddings": inputs.position_embeddings}  # fmt: skip

    def block(self, index: int, params: Params, hidden: torch.Tensor, inputs: StageInputs) -> torch.Tensor:
        """Decoder layer ``index`` on ``params`` (names relative to the layer): [B, T, H] → [B, T, H]."""
        out = functional_call(self.blocks[index], dict(params), (hidden,), self.layer_inputs(index, inputs),
                              tie_weights=False)  # fmt: skip
        return out[0] if isinstance(out, tuple) else out

    def _trace(self, index: int, shell: nn.Module) -> object:
        """Block ``index``'s forward on ``shell`` for a two-token batch on the meta device (the
        rotary embeddings as meta tensors of their width)."""
        dtype = next(self.blocks[index].parameters()).dtype
        inputs = self.prepare(self.validate({"input_ids": torch.tensor([[2, 3]])}), torch.device("meta"), dtype)
        width = 2 * self._rotary.inv_freq.numel()
        cos, sin = (torch.empty(1, 2, width, dtype=dtype, device="meta") for _ in range(2))
        inputs.position_embeddings = (cos, sin)
        return shell(torch.empty(1, 2, self.config.hidden_size, dtype=dtype, device="meta"),
                     **self.layer_inputs(index, inputs))  # fmt: skip

    def segmented_block(self, index: int, params: Params) -> SegmentStarter:
        """Block ``index`` bound once to ``params``, run a unit at a time (``DecoderLayout.segmented``)."""
        return self.layout.segmented(index, params, lambda inputs: self.layer_inputs(index, inputs))

    def bound_layer(self, index: int, params: Params) -> Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]:
        """Layer ``index`` bound once to ``params``, called on the step's ``layer_inputs`` (see
        ``OPTAdapter.bound_layer``)."""
        return bound_layer_call(bind_layer(self.blocks[index], params))

    def final_hidden(self, params: EndParams, hidden: torch.Tensor) -> torch.Tensor:
        return self._call("norm", params, hidden)

    def head(self, params: EndParams, hidden: torch.Tensor, final: bool = False) -> torch.Tensor:
        """The final norm (unless ``final``: ``hidden`` is already the decoder's last state), then
        the LM head: logits [B, T, V]."""
        return self.layout.logits(params, hidden if final else self.final_hidden(params, hidden))

    def head_loss(self, params: EndParams, hidden: torch.Tensor, batch: Batch, final: bool = False) -> torch.Tensor:
        """The causal-LM loss over vocabulary chunks (``vocab.loss_over_chunks``); ``final``:
        ``hidden`` is already the decoder's last state."""
        return self.layout.loss(params, hidden if final else self.final_hidden(params, hidden), batch)

    def causal_lm_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.model.loss_function(logits=logits, labels=batch.labels, vocab_size=self.config.vocab_size)
