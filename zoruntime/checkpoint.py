"""Checkpoints: full snapshots of the master weights that a crash cannot corrupt.

A checkpoint is a folder ``checkpoint-<step>`` with ``weights.safetensors`` (one flat tensor per
group, under the group's name: ``embed_head``, ``block.0`` ...) and ``state.json`` (the step to resume at, the direction
scheme it was written under, the layout it was written for, and whatever the caller adds, such
as the data position). It is written under a temporary name, fsynced and renamed; then the
``latest`` file is replaced atomically to point at it, and all but the ``KEEP`` newest
checkpoints are removed. A crash at any moment leaves ``latest`` naming a complete checkpoint;
a full disk raises ``CheckpointError`` and keeps the previous one. A newest checkpoint that
cannot be read (truncated, corrupt) is passed over for the one before it, and the caller is
told which file was bad. The checkpoint that would be loaded is refused (``CheckpointError``)
if its direction scheme (``zo.directions.DIRECTION_SCHEME``) is missing or differs: resuming
from it would regenerate different directions from the run's seeds. There is no falling back
to an older checkpoint then (all of a run's checkpoints share its scheme, and an older one
would silently throw steps away). The caller applies the pending update first
(``Runtime.save_checkpoint`` does), so the weights hold every update up to the step.
``restore_checkpoint`` loads one into a model's parameters through its adapter's groups (its
blocks cut into the units the writing run streamed).
Knows nothing about runtimes or training.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .models.adapter import ModelAdapter, adapter_for
from .policies.base import UNIT_KINDS
from .zo.directions import DIRECTION_SCHEME

LATEST = "latest"
SCHEME_KEY = "direction_scheme"
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
    """Write the checkpoint of ``step`` into ``root`` atomically; returns its folder. ``state``
    is stored with the step and this zoruntime's direction scheme."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"checkpoint-{step:08d}"
    final, tmp = root / name, root / f"{name}.tmp"
    previous = latest_checkpoint(root)
    published = False  # ``latest`` names the new checkpoint
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(_separate(groups), str(tmp / "weights.safetensors"))
        (tmp / "state.json").write_text(json.dumps({"step": step, **state, SCHEME_KEY: DIRECTION_SCHEME}, indent=2))
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
        published = True
        _fsync(root)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if published:
            kept = f"it is complete and {LATEST} names it, but a power loss now may still undo the rename"
        elif previous:
            kept = f"the previous checkpoint ({previous.name}) is intact"
        else:
            kept = "there is no earlier checkpoint"
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
        if not isinstance(state, dict):
            raise ValueError("state.json does not hold an object")
        return load_file(str(folder / "weights.safetensors")), state
    except (OSError, ValueError, SafetensorError) as error:
        raise CheckpointError(f"{folder} cannot be read ({type(error).__name__}: {error})") from error


def _check_scheme(folder: Path, state: dict[str, Any]) -> None:
    scheme = state.get(SCHEME_KEY)
    if scheme == DIRECTION_SCHEME:
        return
    written = (
        "records no direction scheme (it was written before zoruntime recorded one: scheme 1)"
        if scheme is None
        else f"was written with direction scheme {scheme}"
    )
    raise CheckpointError(
        f"the checkpoint {folder} {written}, this zoruntime draws scheme {DIRECTION_SCHEME}: resuming from it "
        "would regenerate different directions from the run's seeds; resume it with the zoruntime version that "
        "wrote it, or start a new run"
    )


def load_checkpoint(root: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str]]:
    """The groups and state of the newest readable checkpoint in ``root``, and one line for
    each newer one that could not be read (and was passed over). A readable checkpoint of
    another direction scheme is refused, not passed over."""
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
        _check_scheme(folder, state)
        return groups, state, skipped
    raise CheckpointError(f"no readable checkpoint in {root}: {'; '.join(skipped)}")


def layout_fingerprint(adapter: ModelAdapter) -> list[list[Any]]:
    """What a checkpoint must match: every group's parameter names, size and dtype."""
    return [[lay.group, lay.numel, str(lay.dtype), [p.name for p in lay.slices]] for lay, _ in adapter.groups()]


def _group_names(adapter: ModelAdapter) -> dict[int, str]:
    """Group id → its name (a checkpoint's key for it), in group order."""
    return {u.group: u.group_name for u in sorted(adapter.units, key=lambda u: u.group)}


def group_snapshot(adapter: ModelAdapter, masters: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors: each group's master buffer (by group id) under the group's name."""
    return {name: masters[group] for group, name in _group_names(adapter).items()}


def _adapter_written_by(model: nn.Module, layout: Any) -> ModelAdapter | None:
    """``model``'s adapter whose groups a checkpoint of ``layout`` holds: its blocks cut into the
    units the writing runtime streamed (whole blocks, halves or linears), or None."""
    for unit in UNIT_KINDS:
        try:
            adapter = adapter_for(model, unit)
        except ValueError:  # blocks this model cannot be cut into
            continue
        if layout == layout_fingerprint(adapter):
            return adapter
    return None


def restore_checkpoint(model: nn.Module, root: str | Path) -> dict[str, Any]:
    """Load the newest readable checkpoint in ``root`` into ``model``'s parameters; returns its
    state (``state["step"]`` is where a ``Runtime(..., start_step=...)`` continues) with
    ``state["passed_over"]``: a line for each newer checkpoint that was damaged."""
    groups, state, passed_over = load_checkpoint(root)
    adapter = _adapter_written_by(model, state.get("layout"))
    if adapter is None:
        raise CheckpointError(
            f"the checkpoint in {root} was written for a different model (its groups, sizes or dtypes differ); "
            "resume with the model the run started from"
        )
    names = _group_names(adapter)
    with torch.no_grad():
        for layout, params in adapter.groups():
            for name, view in layout.views(groups[names[layout.group]]).items():
                params[name].copy_(view)
    return {**state, "passed_over": passed_over}
