"""The log of updates made and not yet in every group, by step.

Each step that makes an update adds it here. A group's authoritative copy (a host master, or
a buffer that stays on the compute device) carries a stamp: the step of the last update it
holds. When a group is next on the compute side, ``missing(stamp)`` lists the updates it
still needs, oldest first, and they are applied in that order, so a copy that missed several
steps catches up to bitwise what it would hold had it been updated every step. Once every
group's copy holds an update, ``settle`` forgets it (with offloads every k steps a host master
may lag for k − 1 steps, and the updates it lacks stay here until it catches up).
Knows updates and stamps; nothing of tensors' places or of scheduling.
"""

from __future__ import annotations

from .update import PendingUpdate


class UpdateLog:
    """Pending updates in step order."""

    def __init__(self) -> None:
        self._pending: list[PendingUpdate] = []

    def add(self, update: PendingUpdate) -> None:
        if self._pending and update.step <= self._pending[-1].step:
            raise ValueError(f"update of step {update.step} added after step {self._pending[-1].step}")
        self._pending.append(update)

    def missing(self, holds: int) -> list[PendingUpdate]:
        """The updates a copy that holds every update up to step ``holds`` still needs, in order."""
        return [u for u in self._pending if u.step > holds]

    def settle(self, through: int) -> None:
        """Every group's authoritative copy holds every update up to step ``through``: forget those."""
        self._pending = [u for u in self._pending if u.step > through]

    def __len__(self) -> int:
        return len(self._pending)
