"""Checkpoints: full snapshots of the master weights that a crash cannot corrupt.

A checkpoint is a folder ``checkpoint-<step>`` with ``weights.safetensors`` (one flat tensor per
group: ``resident``, ``block.000`` ...) and ``state.json`` (the step to resume at, the layout it
was written for, and whatever the caller adds, such as the data position). It is written under
a temporary name, fsynced and renamed; then the ``latest`` file is replaced atomically to point
at it, and all but the ``KEEP`` newest checkpoints are removed. A crash at any moment leaves
``latest`` naming a complete checkpoint; a full disk raises ``CheckpointError`` and keeps the
previous one. A newest checkpoint that cannot be read (truncated, corrupt) is passed over for
the one before it, and the caller is told which file was bad. The
caller applies the pending update first (``Runtime.save_checkpoint`` does), so the weights hold
every update up to the step. Knows nothing about runtimes or training.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

LATEST = "latest"
KEEP = 2
"""Checkpoints kept: the newest and the one before it, so a damaged newest one is not the end."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says what is intact."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_checkpoint(root: str | Path) -> Path | None:
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    return Path(root) / pointer.read_text().strip()


def _separate(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage: clone any that do."""
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        key = tensor.untyped_storage().data_ptr()
        out[name] = tensor.detach().clone() if key in seen else tensor.detach().contiguous()
        seen.add(key)
    return out


def save_checkpoint(root: str | Path, step: int, groups: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> Path:
    """Write the checkpoint of ``step`` into ``root`` atomically; returns its folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"checkpoint-{step:08d}"
    final, tmp = root / name, root / f"{name}.tmp"
    previous = latest_checkpoint(root)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(_separate(groups), str(tmp / "weights.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        for file in tmp.iterdir():
            _fsync(file)
        _fsync(tmp)
        if final.exists():  # the same step written again (after a resume): swap, never delete first
            stale = root / f"{name}.old"
            shutil.rmtree(stale, ignore_errors=True)
            final.rename(stale)
            tmp.rename(final)
            shutil.rmtree(stale)
        else:
            tmp.rename(final)
        pointer = root / f"{LATEST}.tmp"
        pointer.write_text(name)
        _fsync(pointer)
        os.replace(pointer, root / LATEST)
        _fsync(root)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the previous checkpoint ({previous.name}) is intact" if previous else "there is no earlier checkpoint"
        raise CheckpointError(
            f"could not write the checkpoint of step {step} to {root}: {error.strerror or error}; {kept}"
        ) from error
    for old in checkpoints(root)[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoint folders in ``root``, newest (highest step) first."""
    found = [p for p in Path(root).glob("checkpoint-*") if p.is_dir() and p.name[len("checkpoint-") :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len("checkpoint-") :]), reverse=True)


def _read(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        state = json.loads((folder / "state.json").read_text())
        return load_file(str(folder / "weights.safetensors")), state
    except (OSError, ValueError, SafetensorError) as error:
        raise CheckpointError(f"{folder} cannot be read ({type(error).__name__}: {error})") from error


def load_checkpoint(root: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """The groups and state of the newest readable checkpoint in ``root``, and one line for
    each newer one that could not be read (and was passed over)."""
    newest = latest_checkpoint(root)
    candidates = checkpoints(root)
    if newest is not None and newest in candidates:  # ``latest`` names the newest complete one
        candidates.remove(newest)
        candidates.insert(0, newest)
    if not candidates:
        raise CheckpointError(f"no checkpoint in {root}; start a new run instead")
    skipped: list[str] = []
    for folder in candidates:
        try:
            groups, state = _read(folder)
        except CheckpointError as error:
            skipped.append(f"passed over a damaged checkpoint: {error}")
            continue
        return groups, state, skipped
    raise CheckpointError(f"no readable checkpoint in {root}: {'; '.join(skipped)}")
