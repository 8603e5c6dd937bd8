"""What every decoder-only adapter shares: laying a model out as groups and units, running one
of its modules on given weights, the token embedding and the LM head a chunk of the
vocabulary at a time (``vocab``), and a block bound once to weights, whole or a unit at a time
(``segments``).

A decoder has end modules (the embedding stage's and the head's, one group, ``embed_head``,
where a tied head is one entry) and a list of blocks (a group each). The end modules named
``embed_tokens`` and ``lm_head`` are vocabulary-sized: their parameters may be given as
``RowSource``s rather than tensors. Which modules those are, and which parameters take weight
decay, is the adapter's call; this module knows nothing of any model family.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..runtime.units import Stage, Unit, UnitTable
from .batch import Batch
from .groups import GroupLayout, Params
from .segments import SegmentedLayer, SegmentRun, call_bound, call_order, cut, segment_params, shell_of
from .vocab import RowSource, TokenLookup, gather_rows, logits_in_chunks, loss_over_chunks

SegmentStarter = Callable[[torch.Tensor, Any], SegmentRun]
"""``start(hidden, inputs)``: one forward of a segmented block, not yet running."""

EndParams = Mapping[str, torch.Tensor | RowSource]
"""The embed_head group's parameters by canonical name: vocabulary-sized ones may be row sources."""

VOCAB_MODULES = ("embed_tokens", "lm_head")
"""The end modules whose parameters have a row per vocabulary entry."""

EMBED_HEAD_GROUP = 0
"""Group id of the end modules; block i is group i + 1."""

Decayed = Callable[[nn.Module, str], bool]
"""``decayed(module, local_name)``: whether the parameter takes weight decay."""


def _segment_name(modules: Sequence[str], unit: str) -> str:
    """``attention``/``mlp`` for halves; else the segment's linear layer (``fc1``), or its first
    and last (``q_proj-out_proj``)."""
    if unit == "half":
        return "attention" if any("attn" in m.split(".")[0] for m in modules) else "mlp"
    linear = [m.rpartition(".")[2] for m in modules if "norm" not in m.rpartition(".")[2].lower()] or [modules[0]]
    return linear[0] if len(linear) == 1 else f"{linear[0]}-{linear[-1]}"


class DecoderLayout:
    """The groups and units of a decoder: ``ends`` (prefix → module, None where the config has
    none) in one group, each of ``blocks`` in a group of its own, or, with ``unit`` "half" or
    "linear", in one group per segment (``segments``); ``trace(index, shell)`` runs block
    ``index``'s forward on a copy of it (on the meta device), to learn the order it calls its
    modules in."""

    def __init__(
        self,
        ends: Mapping[str, nn.Module | None],
        blocks: Sequence[nn.Module],
        decayed: Decayed,
        unit: str = "block",
        trace: Callable[[int, nn.Module], object] | None = None,
    ) -> None:
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
        self.unit = unit
        self._cuts: dict[tuple[object, ...], list[list[str]]] = {}  # by layer class and shapes: traced once each
        self.segments = [self._segments(i, trace) for i in range(len(self.blocks))]  # module names, per block
        self.segment_params: list[dict[str, nn.Parameter]] = []  # one per streamable group, in model order
        self.block_layouts: list[GroupLayout] = []
        streamed: list[Unit] = []
        for i, (block, params) in enumerate(zip(self.blocks, self.block_params, strict=True)):
            names = segment_params(block, self.segments[i])
            for part, segment in enumerate(names):
                entries = [(n, params[n], decayed(block.get_submodule(n.rpartition(".")[0]), n)) for n in segment]
                layout = GroupLayout.of(EMBED_HEAD_GROUP + 1 + len(self.block_layouts), entries)
                name = f"block.{i}" if len(names) == 1 else f"block.{i}.{_segment_name(self.segments[i][part], unit)}"
                streamed.append(Unit(name, layout.group, name, Stage.BLOCK, i, layout.nbytes, True, layout.trainable,
                                     part, len(names)))  # fmt: skip
                self.block_layouts.append(layout)
                self.segment_params.append({n: params[n] for n in segment})
        self.vocab_names = frozenset(
            self.canonical[id(p)] for key in VOCAB_MODULES if key in self.ends for p in self.ends[key].parameters()
        )
        self._shells = {prefix: shell_of(module) for prefix, module in self.ends.items()}  # run by call_bound
        self._row_embedding = shell_of(self.ends["embed_tokens"])
        setattr(self._row_embedding, "padding_idx", None)  # noqa: B010 (rows of part of the table: forward only)
        shared, kept = self.embed_head_layout, (self.embed_head_layout.group, "embed_head")  # one group, two units
        self.units = UnitTable(
            (
                Unit("embed", *kept, Stage.EMBED, 0, shared.nbytes, False, shared.trainable),
                *streamed,
                Unit("head", *kept, Stage.HEAD, 0, shared.nbytes, False, shared.trainable),
            )
        )

    def _segments(self, index: int, trace: Callable[[int, nn.Module], object] | None) -> list[list[str]]:
        """Block ``index``'s modules cut for ``self.unit``; a model's blocks of one shape are traced
        once (not two models': a config may change the order, as OPT's post-layer-norm does)."""
        block = self.blocks[index]
        owners = [n for n, m in block.named_modules() if any(True for _ in m.parameters(recurse=False))]
        if self.unit == "block":
            return [owners]
        if trace is None:
            raise ValueError(f"unit={self.unit!r} needs the adapter to trace its blocks")
        shape = (type(block), tuple((n, p.shape) for n, p in block.named_parameters()))
        if shape not in self._cuts:
            try:
                order = call_order(block, lambda shell: trace(index, shell))
            except Exception as error:  # data-dependent control flow (experts) cannot run on meta tensors
                raise ValueError(f"{type(block).__name__} cannot be streamed as unit={self.unit!r} "
                                 f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                                 "use unit='block'") from None  # fmt: skip
            self._cuts[shape] = cut(block, order, self.unit)
        return self._cuts[shape]

    def segmented(self, index: int, params: Params, layer_kwargs: Callable[[Any], dict[str, Any]]) -> SegmentStarter:
        """Block ``index`` bound once to ``params`` (every segment's, by names relative to the
        block), paused before each of its segments after the first: ``start(hidden, inputs)`` begins
        a forward with the adapter's ``layer_kwargs(inputs)``."""
        layer = SegmentedLayer(self.blocks[index], params, self.segments[index])

        def start(hidden: torch.Tensor, inputs: Any) -> SegmentRun:
            def call(shell: nn.Module) -> torch.Tensor:
                out = shell(hidden, **layer_kwargs(inputs))
                return out[0] if isinstance(out, tuple) else out

            return layer.start(call)

        return start

    def groups(self) -> list[tuple[GroupLayout, dict[str, nn.Parameter]]]:
        """Every group's layout and parameters, by group id: the ends first, then the blocks (each
        block's segments in order)."""
        blocks = [(lay, dict(params)) for lay, params in zip(self.block_layouts, self.segment_params, strict=True)]
        return [(self.embed_head_layout, dict(self.ends_params)), *blocks]

    def call_end(self, prefix: str, params: EndParams, *args: object, **kwargs: object) -> torch.Tensor:
        """End module ``prefix`` on the embed_head group's ``params`` (by canonical name)."""
        return call_bound(self._shells[prefix], self._local(prefix, params), *args, **kwargs)

    def _local(self, prefix: str, params: EndParams) -> dict[str, Any]:
        return {n: params[self.canonical[id(p)]] for n, p in self.ends[prefix].named_parameters()}

    def embed_tokens(self, params: EndParams, input_ids: torch.Tensor, lookup: TokenLookup) -> torch.Tensor:
        """The token embedding of ``input_ids``: from the whole table when it is a tensor, else from
        the rows of the batch's tokens alone, gathered chunk by chunk (the same values: a lookup copies)."""
        local = self._local("embed_tokens", params)
        if all(isinstance(p, torch.Tensor) for p in local.values()):
            return call_bound(self._shells["embed_tokens"], local, input_ids)
        rows = {name: gather_rows(source, lookup) for name, source in local.items()}
        return call_bound(self._row_embedding, rows, lookup.local_ids)

    def _lm_head(self, params: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
        return call_bound(self._shells["lm_head"], params, hidden)

    def logits(self, params: EndParams, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on the decoder's last state: logits [B, T, V], a chunk of rows at a time."""
        return logits_in_chunks(self._lm_head, self._local("lm_head", params), hidden).contiguous()

    def loss(self, params: EndParams, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The causal-LM loss from the decoder's last state (``vocab.loss_over_chunks``)."""
        return loss_over_chunks(self._lm_head, self._local("lm_head", params), hidden, batch)
