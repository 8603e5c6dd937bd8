"""What every decoder-only adapter shares: laying a model out as groups and units, running one
of its modules on given weights, and binding a block to weights once.

A decoder has end modules (the embedding stage's and the head's, one group, ``embed_head``,
where a tied head is one entry) and a list of blocks (a group each). Which modules those are,
and which parameters take weight decay, is the adapter's call; this module knows nothing of any
model family.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from ..runtime.units import Stage, Unit, UnitTable
from .groups import GroupLayout, Params

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

    def call_end(self, prefix: str, params: Params, *args: object, **kwargs: object) -> torch.Tensor:
        """End module ``prefix`` on the embed_head group's ``params`` (by canonical name)."""
        module = self.ends[prefix]
        local = {n: params[self.canonical[id(p)]] for n, p in module.named_parameters()}
        return functional_call(module, local, args, kwargs, tie_weights=False)


def bind_layer(layer: nn.Module, params: Params) -> nn.Module:
    """A copy of ``layer`` that shares no weights: each parameter's place holds the tensor of the
    same name in ``params``, so calling it runs the layer's own code on those tensors (as they are
    at the call) without rebinding them each time. Refuses params that lack one."""
    nothing = torch.empty(0)
    shell = copy.deepcopy(layer, memo={id(p): nothing for p in layer.parameters()})  # copies no weights
    for name, tensor in params.items():
        owner, _, attr = name.rpartition(".")
        shell.get_submodule(owner)._parameters[attr] = tensor  # type: ignore[assignment]
    if any(p is nothing for p in shell.parameters()):
        raise ValueError("params lack some of the block's parameters")
    return shell
