"""The step journal: one JSON line per step (step, seed, projected gradient, lr, eps, losses,
which batch), appended, flushed and fsynced, so a crash loses at most the step in flight.

With the base weights, the journal alone rebuilds the trained weights (z comes from the
seeds). A torn last line from a crash is skipped on reading, never fatal. Knows nothing about
models or runtimes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .zo.stats import StepStats


@dataclass(frozen=True, slots=True)
class Record:
    step: int
    seed: int
    lr: float
    eps: float
    weight_decay: float
    loss_plus: float
    loss_minus: float
    projected_grad: float
    batch: int  # index of the training batch the step used
    skipped: bool = False  # a loss was not finite: the step made no update

    @classmethod
    def of(cls, stats: StepStats, eps: float, weight_decay: float, batch: int) -> Record:
        return cls(
            stats.step, stats.seed, stats.lr, eps, weight_decay, stats.loss_plus, stats.loss_minus,
            stats.projected_grad, batch, stats.skipped,
        )  # fmt: skip


class Journal:
    """Append-only; each ``append`` is durable when it returns."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run)

    def append(self, record: Record) -> None:
        self._file.write(json.dumps(asdict(record)) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_journal(path: str | Path) -> list[Record]:
    """Every complete (newline-terminated) record; a torn last line is skipped."""
    return list(_records(Path(path)))


def _records(path: Path) -> Iterator[Record]:
    *complete, _torn = path.read_text(encoding="utf-8").split("\n")  # a crash leaves the last piece non-empty
    for number, line in enumerate(complete, start=1):
        try:
            fields: dict[str, Any] = json.loads(line)
            yield Record(**fields)
        except (ValueError, TypeError):
            raise ValueError(f"{path}:{number}: corrupt journal record before the last line") from None


def truncate_journal(path: str | Path, before_step: int) -> int:
    """Keep only the records of steps before ``before_step`` (a resumed run redoes the rest);
    written to a temporary file and renamed, so a crash keeps the old journal. Returns how many."""
    path = Path(path)
    if not path.exists():
        return 0
    kept = [r for r in read_journal(path) if r.step < before_step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as file:
        file.writelines(json.dumps(asdict(r)) + "\n" for r in kept)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
    return len(kept)
