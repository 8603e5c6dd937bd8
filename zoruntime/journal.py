"""The step journal: one JSON line per step (step, seed, lr, eps, every probe's loss, each
direction's projected gradient and the estimator, which batch), appended, flushed and fsynced,
so a crash loses at most the step in flight. Records written before steps had several
directions (``loss_plus``, ``loss_minus``, ``projected_grad``) are read as one two-sided direction.

With the base weights, the journal alone rebuilds the trained weights (z comes from the
seeds). Its first line is a header saying what the run started from (the base model and a
fingerprint of its weights), so a replay can refuse the wrong base, and which direction scheme
drew z (``zo.directions.DIRECTION_SCHEME``). Reading a journal for replay or resume
(``read_journal``, ``read_header``, ``truncate_journal``, or appending to it with ``Journal``)
refuses one whose scheme is missing (written before schemes were recorded: scheme 1) or
differs, since its seeds would regenerate other directions. A torn last line from a crash is
skipped on reading, never fatal; a damaged line before it is an error that names the file and
the line. Knows nothing about models or runtimes.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .runs import replace_file
from .zo.directions import DIRECTION_SCHEME
from .zo.stats import StepStats


@dataclass(frozen=True, slots=True)
class Record:
    step: int
    seed: int
    lr: float
    eps: float
    weight_decay: float
    losses: list[float]  # in probe order (zo.stats.StepStats)
    projected_grads: list[float]  # one per direction
    batch: int  # index of the training batch the step used
    skipped: bool = False  # a loss was not finite: the step made no update
    rounding: str = "nearest"  # how 16-bit masters took the update (journals before it: nearest)
    estimator: str = "two-sided"  # what turns the projected gradients into the step (zo.estimator)

    @classmethod
    def of(cls, stats: StepStats, eps: float, weight_decay: float, batch: int, rounding: str) -> Record:
        return cls(
            stats.step, stats.seed, stats.lr, eps, weight_decay, list(stats.losses), list(stats.projected_grads),
            batch, stats.skipped, rounding, stats.estimator,
        )  # fmt: skip

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> Record:
        """A record from its JSON fields, those of a journal written before several directions too."""
        if "projected_grad" in fields:
            fields = dict(fields)
            fields["losses"] = [fields.pop("loss_plus"), fields.pop("loss_minus")]
            fields["projected_grads"] = [fields.pop("projected_grad")]
        return cls(**fields)


HEADER_KEY = "zoruntime_journal"
VERSION = 2  # 2: losses and projected_grads as lists, one g per direction
SCHEME_KEY = "direction_scheme"


class JournalError(ValueError):
    """The journal is damaged or of another direction scheme; the message names the file (and
    the line) and what to do."""


class Journal:
    """Append-only; each ``append`` is durable when it returns. A new (or empty) journal starts
    with a header: ``header``'s fields and this zoruntime's direction scheme. Appending to an
    existing journal of another scheme is refused. A torn last line (a crash mid-write) is cut
    before the first append, and a write that fails part-way is cut back, so a later record
    always starts on a line of its own."""

    def __init__(self, path: str | Path, header: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        if not fresh:
            _check_scheme(self.path, _first_line(self.path))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run)
        if not fresh:
            self._file.truncate(_complete_size(self.path))
        if fresh:
            self._write({HEADER_KEY: VERSION, **(header or {}), SCHEME_KEY: DIRECTION_SCHEME})

    def _write(self, fields: dict[str, Any]) -> None:
        start = self._file.tell()
        try:
            self._file.write(json.dumps(fields) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        except BaseException:
            self._file.truncate(start)  # a torn line would swallow the next record
            raise

    def append(self, record: Record) -> None:
        self._write(asdict(record))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_journal(path: str | Path) -> list[Record]:
    """Every complete (newline-terminated) record; a torn last line is skipped. Refuses a
    journal of another direction scheme."""
    path = Path(path)
    _check_scheme(path, _first_line(path))
    return list(_records(path))


def read_header(path: str | Path) -> dict[str, Any] | None:
    """The journal's header (None for a journal with no complete line yet). Refuses a journal
    of another direction scheme, or with no header (written before headers existed)."""
    path = Path(path)
    return _check_scheme(path, _first_line(path))


def _complete_size(path: Path) -> int:
    """The size of ``path`` up to and including its last newline: without a torn last line."""
    data = path.read_bytes()
    return data.rfind(b"\n") + 1


def _first_line(path: Path) -> str:
    with open(path, encoding="utf-8") as file:
        return file.readline()


def _header(first: str) -> dict[str, Any] | None:
    try:
        fields = json.loads(first) if first.endswith("\n") else None
    except ValueError:
        return None
    return fields if isinstance(fields, dict) and HEADER_KEY in fields else None


def _is_record(line: str) -> bool:
    try:
        fields = json.loads(line)
    except ValueError:
        return False
    return isinstance(fields, dict) and "step" in fields and "seed" in fields


def _check_scheme(path: Path, first: str) -> dict[str, Any] | None:
    """The header of the journal whose first line is ``first``, if its direction scheme is this
    zoruntime's; a JournalError if not. A journal with no complete line holds no step to check."""
    if not first.endswith("\n"):
        return None
    header = _header(first)
    if header is None and not _is_record(first):
        raise JournalError(
            f"{path}, line 1: damaged header; the direction scheme the journal was written with cannot be known: "
            "restore the file from a copy"
        )
    scheme = header.get(SCHEME_KEY) if header is not None else None
    if scheme == DIRECTION_SCHEME:
        return header
    if scheme is None:
        written = "records no direction scheme (it was written before zoruntime recorded one: scheme 1)"
    else:
        written = f"was written with direction scheme {scheme}"
    raise JournalError(
        f"journal {path} {written}, this zoruntime draws scheme {DIRECTION_SCHEME}: its seeds would regenerate "
        "other directions; replay or resume it with the zoruntime version that wrote it"
    )


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    *complete, _torn = path.read_text(encoding="utf-8").split("\n")  # a crash leaves the last piece non-empty
    for number, line in enumerate(complete, start=1):
        if number == 1 and HEADER_KEY in line and line.lstrip().startswith("{"):
            continue
        yield number, line


def _parse(path: Path, number: int, line: str) -> Record:
    try:
        fields: dict[str, Any] = json.loads(line)
        return Record.from_fields(fields)
    except (ValueError, TypeError, KeyError):
        raise JournalError(
            f"{path}, line {number}: damaged record before the last line; the steps from there on cannot be "
            "replayed: restore the file from a copy, or resume from a checkpoint taken before that step"
        ) from None


def _records(path: Path) -> Iterator[Record]:
    for number, line in _lines(path):
        yield _parse(path, number, line)


def truncate_journal(path: str | Path, before_step: int) -> int:
    """Keep the header and the records of steps before ``before_step`` (a resumed run redoes the
    rest; damage after them goes with them); written to a temporary file and renamed, so a crash
    keeps the old journal. Returns how many records were kept."""
    path = Path(path)
    if not path.exists():
        return 0
    header = read_header(path)  # refuses another direction scheme before anything is changed
    kept: list[Record] = []
    for number, line in _lines(path):
        if kept and kept[-1].step >= before_step - 1:
            break  # everything after is redone by the resumed run
        record = _parse(path, number, line)
        if record.step < before_step:
            kept.append(record)
    lines = itertools.chain(
        [json.dumps(header) + "\n"] if header is not None else [], (json.dumps(asdict(r)) + "\n" for r in kept)
    )
    replace_file(path, lines)
    return len(kept)
