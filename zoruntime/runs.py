"""A run folder: what it holds, who may use it, and how it is checked before anything is written.

A run folder (``zoruntime train --out DIR``) belongs to one run: its configuration
(``zoruntime.json``), journal, checkpoints, base copy, model, summary and trace. A second run
is refused there unless told to ``--overwrite`` (which removes exactly those files) or to
``--resume``. While a run or a replay uses a folder it holds an exclusive lock on
``DIR/.lock`` (``fcntl.flock``, released by the operating system if the process dies), so a
second one is refused with the first one's process id; a folder on a read-only mount, which no
process can write, is used without one (replay reads an archived run). Knows nothing about models or training.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; folders are not guarded there
    fcntl = None  # type: ignore[assignment]

CONFIGURATION = "zoruntime.json"
RUN_FILES = (
    CONFIGURATION, "journal.jsonl", "checkpoints", "base", "model", "summary.json", "trace.json", "timeline.png",
)  # fmt: skip
LOCK = ".lock"


class RunFolderError(Exception):
    """The folder cannot be used as asked; the message says why and what to do instead."""


def check_writable(folder: Path, option: str = "--out") -> None:
    """Refuse a folder that is a file, lies under a file, or cannot be created or written."""
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"{option} {folder} is a file, not a folder; give a folder")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RunFolderError(f"{option} {folder} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunFolderError(f"{option} {folder} is not writable ({existing} does not allow writing); choose another")


def holds_run(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_FILES)


def describe_run(folder: Path) -> str:
    """A few words on the run in ``folder``: how far it got."""
    summary, config = folder / "summary.json", folder / CONFIGURATION
    try:
        if summary.is_file():
            return f"finished, {json.loads(summary.read_text())['steps']} steps"
        if config.is_file():
            return f"unfinished, {json.loads(config.read_text()).get('steps', '?')} steps planned"
    except (ValueError, KeyError, OSError):
        pass
    return "partly written"


def read_configuration(folder: Path) -> dict[str, Any]:
    """The run's ``zoruntime.json``; a RunFolderError naming the file when it is not a JSON object."""
    path = folder / CONFIGURATION
    try:
        fields = json.loads(path.read_text())
        if not isinstance(fields, dict):
            raise ValueError("it does not hold a JSON object")
    except ValueError as error:
        raise RunFolderError(
            f"{path} is damaged ({error}); the run cannot be resumed or replayed without it: restore it from a copy"
        ) from None
    return fields


def replace_file(path: Path, pieces: Iterable[str]) -> None:
    """Write ``pieces`` (text, one after another) to ``path`` under a temporary name, fsync it and
    rename it over ``path``: a failure (a full disk) or a crash leaves the old content, never a
    truncated file; pieces written as they come keep a long file from being held whole."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as file:
            file.writelines(pieces)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def clear_run(folder: Path) -> None:
    """Remove the files of the run in ``folder`` (nothing else that is there)."""
    for name in RUN_FILES:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


class RunLock:
    """Exclusive use of ``folder`` by this process (creates the folder)."""

    def __init__(self, folder: Path, what: str) -> None:
        self.folder = folder
        self.what = what
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:  # what check_writable cannot foresee: /proc, a read-only mount
            raise RunFolderError(
                f"{self.folder} cannot be created ({error.strerror or error}); choose another folder"
            ) from None
        if fcntl is None:
            return self
        path = self.folder / LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            if error.errno == errno.EROFS:  # a read-only mount: no process can write there, nothing to guard
                return self
            raise RunFolderError(
                f"{path} cannot be opened ({error.strerror or error}); choose another folder"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunFolderError(
                f"{self.folder} is in use by {holder}; wait for it to end or use another folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} ({self.what})\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing releases the lock
            self._fd = None
