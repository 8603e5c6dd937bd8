"""The OPT adapter: an unmodified HF ``OPTForCausalLM`` seen as a table of units (embedding
stage, decoder blocks, head) over flat groups (``embed_head``, then one per block).

Each stage runs the model's own sub-modules with parameters passed in explicitly
(``torch.func.functional_call``), so the same stage can run on the master weights, on a
perturbed copy in a scratch buffer, or on a block slot of a GPU. Running the three stages in
order reproduces ``model(input_ids, attention_mask=..., labels=...)`` bit for bit. Knows OPT's
module names, position ids and the causal mask; knows nothing about ZO, offloading or
scheduling.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from transformers import OPTForCausalLM
from transformers.masking_utils import create_causal_mask

from .batch import Batch, make_batch
from .decoder import DecoderLayout, EndParams, SegmentStarter
from .groups import GroupLayout, Params
from .segments import bind_layer, bound_layer_call
from .vocab import TokenLookup

# transformers renamed create_causal_mask's ``past_key_values`` to ``cache`` (between 5.17 and 5.24)
_NO_CACHE = {"cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values": None}


@dataclass(frozen=True, slots=True)
class StageInputs:
    """What every stage of one step shares: the batch on the compute device and its masks."""

    batch: Batch
    position_ids: torch.Tensor  # [B, T] long
    position_mask: torch.Tensor  # [B, T], ones where no mask was given (as HF builds it)
    causal_mask: torch.Tensor | None  # as HF's create_causal_mask returns it for this config
    tokens: TokenLookup  # the batch's tokens as the embedding's chunks see them


def _decayed(module: nn.Module, local_name: str) -> bool:
    return not isinstance(module, nn.LayerNorm) and not local_name.endswith("bias")


class OPTAdapter:
    """Stages of an OPT causal LM. The model is put in eval mode (dropout never runs); its
    parameters' ``requires_grad`` flags are left as the user set them."""

    def __init__(self, model: nn.Module, unit: str = "block") -> None:
        if not isinstance(model, OPTForCausalLM):
            raise TypeError(
                f"zoruntime runs OPT causal LMs (OPTForCausalLM, e.g. facebook/opt-125m); got "
                f"{type(model).__name__}. Load the model with transformers.OPTForCausalLM.from_pretrained(...)"
            )
        model.eval()
        self.model = model
        self.config = model.config
        decoder = model.model.decoder
        self._decoder = decoder
        self.blocks: list[nn.Module] = list(decoder.layers)
        self._ends_modules: dict[str, nn.Module | None] = {
            "embed_tokens": decoder.embed_tokens,
            "embed_positions": decoder.embed_positions,
            "project_in": decoder.project_in,
            "final_layer_norm": decoder.final_layer_norm,
            "project_out": decoder.project_out,
            "lm_head": model.lm_head,
        }
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
        return self.model.lm_head.weight is self._decoder.embed_tokens.weight

    def embed_head_parameters(self) -> dict[str, nn.Parameter]:
        """Canonical name → parameter for the embed/head group (a tied head appears once)."""
        return dict(self.layout.ends_params)

    def block_parameters(self, index: int) -> dict[str, nn.Parameter]:
        """Name (relative to the block) → parameter of decoder block ``index``."""
        return dict(self.layout.block_params[index])

    def groups(self) -> list[tuple[GroupLayout, dict[str, nn.Parameter]]]:
        """Every group's layout and parameters, by group id: embed_head first, then the blocks in order."""
        return self.layout.groups()

    def parts(self) -> dict[str, list[nn.Parameter]]:
        """ "embeddings" (tokens, positions, project_in), "head" (final norm, project_out, LM head)
        and "block.N"."""
        ends = {"embeddings": ("embed_tokens", "embed_positions", "project_in"),
                "head": ("final_layer_norm", "project_out", "lm_head")}  # fmt: skip
        found = {
            part: [p for key in keys if (m := self._ends_modules[key]) is not None for p in m.parameters()]
            for part, keys in ends.items()
        }
        return found | {f"block.{i}": list(block.parameters()) for i, block in enumerate(self.blocks)}

    # -- inputs -------------------------------------------------------------------------------
    def validate(self, batch: Batch | Mapping[str, object]) -> Batch:
        return make_batch(batch, vocab_size=self.config.vocab_size, max_positions=self.config.max_position_embeddings)

    def prepare(self, batch: Batch, device: torch.device, dtype: torch.dtype) -> StageInputs:
        """Build position ids and the causal mask where the batch is (the host, normally), then move
        everything to ``device``: HF's mask builder inspects the mask's values, which on a GPU
        would stall the host."""
        ids = batch.input_ids
        given = batch.attention_mask
        position_mask = torch.ones(ids.shape, device=ids.device) if given is None else given
        # OPT's learned positions count only attended tokens (left padding shifts them)
        position_ids = (torch.cumsum(position_mask, dim=1) * position_mask - 1).long()
        shape_probe = torch.empty((ids.shape[0], ids.shape[1], 0), dtype=dtype, device=ids.device)
        causal_mask = create_causal_mask(
            config=self.config, inputs_embeds=shape_probe, attention_mask=given, **_NO_CACHE
        )
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return StageInputs(
            batch.to(device),
            move(position_ids),
            move(position_mask),
            None if causal_mask is None else move(causal_mask),
            TokenLookup.of(ids, *self._decoder.embed_tokens.weight.shape).to(device),
        )

    # -- stages -------------------------------------------------------------------------------
    def _call(self, key: str, params: EndParams, *args: object, **kwargs: object) -> torch.Tensor:
        return self.layout.call_end(key, params, *args, **kwargs)

    def embed(self, params: EndParams, inputs: StageInputs) -> torch.Tensor:
        """Token + position embeddings (and project_in): hidden states [B, T, H]."""
        tokens = self.layout.embed_tokens(params, inputs.batch.input_ids, inputs.tokens)
        positions = self._call("embed_positions", params, inputs.position_mask, 0, position_ids=inputs.position_ids)
        if self._ends_modules["project_in"] is not None:
            tokens = self._call("project_in", params, tokens)
        return tokens + positions

    def block(self, index: int, params: Params, hidden: torch.Tensor, inputs: StageInputs) -> torch.Tensor:
        """Decoder block ``index`` on ``params`` (names relative to the block): [B, T, H] → [B, T, H]."""
        out = functional_call(
            self.blocks[index],
            dict(params),
            (hidden,),
            {"attention_mask": inputs.causal_mask, "position_ids": inputs.position_ids},
            tie_weights=False,  # a block ties nothing: skip the bookkeeping, twice per block per step
        )
        return out[0] if isinstance(out, tuple) else out

    def layer_inputs(self, index: int, inputs: StageInputs) -> dict[str, Any]:
        """The keyword arguments a decoder layer takes in this step: the causal mask (None: none
        needed) and the position ids."""
        return {"attention_mask": inputs.causal_mask, "position_ids": inputs.position_ids}

    def _trace(self, index: int, shell: nn.Module) -> object:
        """Block ``index``'s forward on ``shell`` for a two-token batch on the meta device."""
        dtype = next(self.blocks[index].parameters()).dtype
        inputs = self.prepare(self.validate({"input_ids": torch.tensor([[2, 3]])}), torch.device("meta"), dtype)
        hidden = torch.empty(1, 2, self.config.hidden_size, dtype=dtype, device="meta")
        return shell(hidden, **self.layer_inputs(index, inputs))

    def segmented_block(self, index: int, params: Params) -> SegmentStarter:
        """Block ``index`` bound once to ``params``, run a unit at a time (``DecoderLayout.segmented``)."""
        return self.layout.segmented(index, params, lambda inputs: self.layer_inputs(index, inputs))

    def bound_layer(self, index: int, params: Params) -> Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]:
        """Layer ``index`` bound once to ``params``, called on the step's ``layer_inputs``: a copy of
        the HF layer that shares no weights (each parameter's place holds the given tensor), so a
        call costs the layer's forward and no per-call swapping of parameters. Same module code,
        same weights: the same bits as ``block``."""
        return bound_layer_call(bind_layer(self.blocks[index], params))

    def head(self, params: EndParams, hidden: torch.Tensor, final: bool = False) -> torch.Tensor:
        """Final norm and project_out where the config has them (``final``: ``hidden`` is already the
        decoder's last state), then the LM head: logits [B, T, V]."""
        return self.layout.logits(params, hidden if final else self.final_hidden(params, hidden))

    def final_hidden(self, params: EndParams, hidden: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden state: the final norm and project_out where the config has them."""
        if self._ends_modules["final_layer_norm"] is not None:
            hidden = self._call("final_layer_norm", params, hidden)
        if self._ends_modules["project_out"] is not None:
            hidden = self._call("project_out", params, hidden)
        return hidden

    def head_loss(self, params: EndParams, hidden: torch.Tensor, batch: Batch, final: bool = False) -> torch.Tensor:
        """The causal-LM loss over vocabulary chunks (``vocab.loss_over_chunks``); ``final``:
        ``hidden`` is already the decoder's last state."""
        return self.layout.loss(params, hidden if final else self.final_hidden(params, hidden), batch)

    def causal_lm_loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean next-token cross-entropy over labels != -100, computed by the model's own HF loss."""
        return self.model.loss_function(logits=logits, labels=batch.labels, vocab_size=self.config.vocab_size)
