"""Freezing parts of a model by name, for the command line: ``embeddings``, ``head``,
``blocks:A-B`` (inclusive) or ``blocks:N``, comma-separated.

Freezing sets ``requires_grad=False`` on the part's parameters before a runtime is made; the
runtime then neither perturbs nor updates them (``zo/update.py``). The parts come from the
model's adapter (``ModelAdapter.parts``), so the names are the same for every family. A tied
head is the token embedding: freezing either part freezes that tensor. Knows nothing about ZO.
"""

from __future__ import annotations

import re

from torch import nn

from .adapter import adapter_for

_BLOCKS = re.compile(r"^blocks:(\d+)(?:-(\d+))?$")


def parse_freeze(spec: str) -> list[str]:
    """The parts a ``--freeze`` spec names, as adapter part names ("embeddings", "head",
    "block.N"), before any model is loaded; a clear error for anything else."""
    parts: list[str] = []
    for item in (piece.strip() for piece in spec.split(",")):
        if item in ("embeddings", "head"):
            parts.append(item)
            continue
        match = _BLOCKS.match(item)
        if match is None:
            raise ValueError(
                f"--freeze {spec!r}: {item!r} is not embeddings, head, blocks:A-B or blocks:N "
                "(e.g. --freeze embeddings,head,blocks:0-11)"
            )
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise ValueError(f"--freeze {spec!r}: blocks:{first}-{last} runs backwards; write blocks:{last}-{first}")
        parts += [f"block.{i}" for i in range(first, last + 1)]
    return parts


def freeze(model: nn.Module, spec: str) -> list[str]:
    """Set ``requires_grad=False`` on the parts ``spec`` names; returns them. Refuses a part the
    model does not have, and a spec that leaves nothing to train."""
    parts = adapter_for(model).parts()
    wanted = parse_freeze(spec)
    missing = [p for p in wanted if p not in parts]
    if missing:
        blocks = sum(1 for name in parts if name.startswith("block."))
        named = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ValueError(f"--freeze {spec!r}: the model has no {named} (its blocks are 0-{blocks - 1})")
    for name in wanted:
        for param in parts[name]:
            param.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"--freeze {spec!r} freezes every parameter: nothing is left to train")
    return wanted
