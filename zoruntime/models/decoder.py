"""What every decoder-only adapter shares: laying a model out as groups and units, running one
of its modules on given weights, the token embedding and the LM head a chunk of the
vocabulary at a time (``vocab``), and binding a block to weights once.

A decoder has end modules (the embedding stage's and the head's, one group, ``embed_head``,
where a tied head is one entry) and a list of blocks (a group each). The end modules named
``embed_tokens`` and ``lm_head`` are vocabulary-sized: their parameters may be given as
``RowSource``s rather than tensors. Which modules those are, and which parameters take weight
decay, is the adapter's call; this module knows nothing of any model family.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from ..runtime.units import Stage, Unit, UnitTable
from .batch import Batch
from .groups import GroupLayout, Params
from .vocab import RowSource, TokenLookup, gather_rows, logits_in_chunks, loss_over_chunks

EndParams = Mapping[str, torch.Tensor | RowSource]
"""The embed_head group's parameters by canonical name: vocabulary-sized ones may be row sources."""

VOCAB_MODULES = ("embed_tokens", "lm_head")
"""The end modules whose parameters have a row per vocabulary entry."""

EMBED_HEAD_GROUP = 0
"""Group id of the end modules; block i is group i + 1."""

Decayed = Callable[[nn.Module, str], bool]
"""``decayed(module, local_name)``: whether the parameter takes weight decay."""


class DecoderLayout:
    """The groups and units of a decoder: ``ends`` (prefix → module, None where the config has
    none) in one group, each of ``blocks`` in a group of its own."""

    def __init__(self, ends: Mapping[str, nn.Module | None], blocks: Sequence[nn.Module], decayed: Decayed) -> None:
        self.ends = {prefix: module for prefix, module in ends.items() if module is not None}
        self.blocks = list(blocks)
        # canonical name of each end parameter, found by identity so a tied head is one entry
        self.canonical: dict[int, str] = {}
        self.ends_params: dict[str, nn.Parameter] = {}
        entries = []
        for prefix, module in self.ends.items():
            for local, param in module.named_parameters():
                if id(param) in self.canonical:
                    continue
                name = f"{prefix}.{local}"
                self.canonical[id(param)] = name
                self.ends_params[name] = param
                entries.append((name, param, decayed(module, local)))
        self.embed_head_layout = GroupLayout.of(EMBED_HEAD_GROUP, entries)
        self.block_params = [dict(block.named_parameters()) for block in self.blocks]
        self.block_layouts = [
            GroupLayout.of(
                EMBED_HEAD_GROUP + 1 + i,
                [(name, p, decayed(block.get_submodule(name.rpartition(".")[0]), name)) for name, p in params.items()],
            )
            for i, (block, params) in enumerate(zip(self.blocks, self.block_params, strict=True))
        ]
        self.vocab_names = frozenset(
            self.canonical[id(p)] for key in VOCAB_MODULES if key in self.ends for p in self.ends[key].parameters()
        )
        self._row_embedding = _shell(self.ends["embed_tokens"])
        setattr(self._row_embedding, "padding_idx", None)  # noqa: B010 (rows of part of the table: forward only)
        shared, kept = self.embed_head_layout, (self.embed_head_layout.group, "embed_head")  # one group, two units
        self.units = UnitTable(
            (
                Unit("embed", *kept, Stage.EMBED, 0, shared.nbytes, False, shared.trainable),
                *(
                    Unit(f"block.{i}", lay.group, f"block.{i}", Stage.BLOCK, i, lay.nbytes, True, lay.trainable)
                    for i, lay in enumerate(self.block_layouts)
                ),
                Unit("head", *kept, Stage.HEAD, 0, shared.nbytes, False, shared.trainable),
            )
        )

    def groups(self) -> list[tuple[GroupLayout, dict[str, nn.Parameter]]]:
        """Every group's layout and parameters, by group id: the ends first, then the blocks."""
        blocks = [(lay, dict(params)) for lay, params in zip(self.block_layouts, self.block_params, strict=True)]
        return [(self.embed_head_layout, dict(self.ends_params)), *blocks]

    def call_end(self, prefix: str, params: EndParams, *args: object, **kwargs: object) -> torch.Tensor:
        """End module ``prefix`` on the embed_head group's ``params`` (by canonical name)."""
        return functional_call(self.ends[prefix], self._local(prefix, params), args, kwargs, tie_weights=False)

    def _local(self, prefix: str, params: EndParams) -> dict[str, Any]:
        return {n: params[self.canonical[id(p)]] for n, p in self.ends[prefix].named_parameters()}

    def token_lookup(self, input_ids: torch.Tensor) -> TokenLookup:
        """The batch's tokens as the embedding's chunks see them (built where ``input_ids`` are)."""
        weight: torch.Tensor = self.ends["embed_tokens"].get_parameter("weight")
        vocab, width = weight.shape
        return TokenLookup.of(input_ids, vocab, width)

    def embed_tokens(self, params: EndParams, input_ids: torch.Tensor, lookup: TokenLookup) -> torch.Tensor:
        """The token embedding of ``input_ids``: from the whole table when it is a tensor, else from
        the rows of the batch's tokens alone, gathered chunk by chunk (the same values: a lookup copies)."""
        local = self._local("embed_tokens", params)
        if all(isinstance(p, torch.Tensor) for p in local.values()):
            return functional_call(self.ends["embed_tokens"], local, (input_ids,), tie_weights=False)
        rows = {name: gather_rows(source, lookup) for name, source in local.items()}
        return functional_call(self._row_embedding, rows, (lookup.local_ids,), tie_weights=False)

    def _lm_head(self, params: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        return functional_call(self.ends["lm_head"], params, (hidden,), tie_weights=False)

    def logits(self, params: EndParams, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on the decoder's last state: logits [B, T, V], a chunk of rows at a time."""
        return logits_in_chunks(self._lm_head, self._local("lm_head", params), hidden).contiguous()

    def loss(self, params: EndParams, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The causal-LM loss from the decoder's last state (``vocab.loss_over_chunks``)."""
        return loss_over_chunks(self._lm_head, self._local("lm_head", params), hidden, batch)


_NOTHING = torch.empty(0)
"""What a shell holds in place of each weight until it is given one."""


def _shell(module: nn.Module) -> nn.Module:
    """A copy of ``module`` without its weights (each parameter's place holds ``_NOTHING``)."""
    return copy.deepcopy(module, memo={id(p): _NOTHING for p in module.parameters()})


def bind_layer(layer: nn.Module, params: Params) -> nn.Module:
    """A copy of ``layer`` that shares no weights: each parameter's place holds the tensor of the
    same name in ``params``, so calling it runs the layer's own code on those tensors (as they are
    at the call) without rebinding them each time. Refuses params that lack one."""
    shell = _shell(layer)
    for name, tensor in params.items():
        owner, _, attr = name.rpartition(".")
        shell.get_submodule(owner)._parameters[attr] = tensor  # type: ignore[assignment]
    if any(p is _NOTHING for p in shell.parameters()):
        raise ValueError("params lack some of the block's parameters")
    return shell
