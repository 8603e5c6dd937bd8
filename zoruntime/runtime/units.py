"""Units: what the runtime streams and runs, in model order. Stdlib only.

A model adapter yields an ordered table of units. Each unit is one stage of the forward
(the embedding stage, a decoder block, the head and loss) over the parameters of one group, a
flat buffer with one direction per step. A group is moved, updated and written back as a whole;
a unit is what runs on the compute lane. By default a decoder block is one unit and one group;
a policy may ask for it to be streamed as several units, each a group of its own (its halves,
or its linear layers). The embedding stage and the head are two units of one group
(``embed_head``: a tied head shares the token embedding), which stays on the compute device.
Task graphs, storage, the task work and policies speak in units; they know nothing of the
model family behind them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum


class Stage(StrEnum):
    """How a unit runs: embeds the batch, transforms hidden states, or turns them into a loss."""

    EMBED = "embed"
    BLOCK = "block"
    HEAD = "head"


@dataclass(frozen=True, slots=True)
class Unit:
    """One row of the unit table.

    ``group``: the id of the group whose weights it runs on (and whose direction it draws);
    ``group_name``: that group's name (the name of group-wide tasks: upload, update, offload);
    ``index``: the adapter's index of the stage (the block index; 0 for the ends);
    ``nbytes``: bytes of the group's master copy; ``streamable``: a plan may stream the group
    (a group used by units at both ends of the step is kept on the compute device);
    ``trainable``: some parameter of the group is trained (a frozen group is uploaded, never
    updated, perturbed or written back); ``part`` of ``parts``: where the unit falls in its
    block when the block is streamed as several units (its attention and MLP halves, or its
    linear layers), else 0 of 1.
    """

    name: str
    group: int
    group_name: str
    stage: Stage
    index: int
    nbytes: int
    streamable: bool
    trainable: bool = True  # some parameter of its group is trained; a frozen group is never written back
    part: int = 0
    parts: int = 1

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class UnitTable:
    """The units of a model in the order the forward runs them."""

    units: tuple[Unit, ...]

    def __post_init__(self) -> None:
        names = [u.name for u in self.units]
        if len(set(names)) != len(names):
            raise ValueError(f"unit names must be unique, got {names}")
        if not self.units or self.units[0].stage is not Stage.EMBED or self.units[-1].stage is not Stage.HEAD:
            raise ValueError("a unit table runs an embed unit first and a head unit last")
        for group in {u.group for u in self.units}:
            members = [u for u in self.units if u.group == group]
            if any(u.streamable for u in members) and len(members) > 1:
                raise ValueError(f"group {members[0].group_name} is used by several units and cannot be streamed")

    def __iter__(self) -> Iterator[Unit]:
        return iter(self.units)

    def __len__(self) -> int:
        return len(self.units)

    @property
    def streamable(self) -> tuple[Unit, ...]:
        """The units a plan places (resident or streamed), in model order: today the blocks."""
        return tuple(u for u in self.units if u.streamable)

    @property
    def kept(self) -> tuple[Unit, ...]:
        """One unit per group that always stays on the compute device (its first unit)."""
        seen: dict[int, Unit] = {}
        for u in self.units:
            if not u.streamable:
                seen.setdefault(u.group, u)
        return tuple(seen.values())


def uniform_units(num_blocks: int, block_bytes: int = 1, ends_bytes: int = 1) -> UnitTable:
    """The table of a model with ``num_blocks`` equal blocks: embed, the blocks, head (for simulations)."""
    blocks = tuple(
        Unit(f"block.{i}", i + 1, f"block.{i}", Stage.BLOCK, i, block_bytes, True) for i in range(num_blocks)
    )
    embed = Unit("embed", 0, "embed_head", Stage.EMBED, 0, ends_bytes, False)
    head = Unit("head", 0, "embed_head", Stage.HEAD, 0, ends_bytes, False)
    return UnitTable((embed, *blocks, head))
