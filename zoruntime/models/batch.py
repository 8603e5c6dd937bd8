"""A validated training batch: token ids, attention mask and causal-LM labels.

Knows the shape and value rules a batch must obey for a model with a given vocabulary and
number of positions, and how default labels are derived; knows nothing about tokenizers or
tasks. Every error names the problem and the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any

import torch

IGNORE_INDEX = -100
"""Label value that the loss skips (HF convention)."""

_KNOWN = ("input_ids", "attention_mask", "labels")


@dataclass(frozen=True, slots=True)
class Batch:
    """``input_ids`` [B, T] int; ``attention_mask`` [B, T] or None (all ones); ``labels`` [B, T];
    ``extras``: any other tensors of the input mapping, passed through to a custom loss."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    labels: torch.Tensor
    extras: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())

    def check_scored(self) -> None:
        """Refuse a batch in which the causal-LM loss scores no token (a mean over none)."""
        if not bool((self.labels[:, 1:] != IGNORE_INDEX).any()):
            raise ValueError(
                f"the batch has no token to score: every label after a row's first token is {IGNORE_INDEX} or "
                "padding, so its loss is not defined (a step over it would be skipped as non-finite); give at "
                "least one row a labelled token after its first"
            )

    def to(self, device: torch.device) -> Batch:
        mask = None if self.attention_mask is None else self.attention_mask.to(device, non_blocking=True)
        extras = {k: v.to(device, non_blocking=True) for k, v in self.extras.items()}
        return Batch(
            self.input_ids.to(device, non_blocking=True), mask, self.labels.to(device, non_blocking=True), extras
        )


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it (through dataclasses, mappings, tuples)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if is_dataclass(value) and not isinstance(value, type):
        return replace(value, **{f.name: map_tensors(getattr(value, f.name), fn) for f in fields(value)})
    if isinstance(value, Mapping):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(map_tensors(v, fn) for v in value)
    return value


LossFn = Callable[[torch.Tensor, "Batch"], torch.Tensor]
"""``loss_fn(logits [B, T, V], batch) -> 0-d tensor``: replaces the causal-LM loss."""


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be a tensor of token ids, got {type(value).__name__}") from exc


def _check_integer(t: torch.Tensor, name: str) -> None:
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must hold integer token ids (torch.long), got dtype {t.dtype}; use .long()")


def make_batch(batch: Batch | Mapping[str, Any], *, vocab_size: int, max_positions: int) -> Batch:
    """Validate a mapping with ``input_ids`` (and optionally ``attention_mask``, ``labels``).

    Default labels are the input ids with padded positions set to -100; given labels are kept
    except at padded positions, which never count in the loss.
    """
    if isinstance(batch, Batch):
        raw: Mapping[str, Any] = {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "labels": batch.labels,
        }
    elif isinstance(batch, Mapping):
        raw = batch
    else:
        raise TypeError(f"a batch is a mapping with 'input_ids' (like a tokenizer's output), got {type(batch)}")
    if "input_ids" not in raw:
        raise KeyError("the batch has no 'input_ids'; pass {'input_ids': ids, 'attention_mask': mask}")
    ids = _as_tensor(raw["input_ids"], "input_ids")
    _check_integer(ids, "input_ids")
    if ids.dim() != 2:
        raise ValueError(
            f"input_ids must have shape [batch, sequence], got {tuple(ids.shape)}; use ids.unsqueeze(0) for one row"
        )
    if ids.numel() == 0:
        raise ValueError(f"the batch is empty (input_ids shape {tuple(ids.shape)}); give at least one token")
    if ids.shape[1] > max_positions:
        raise ValueError(
            f"sequence length {ids.shape[1]} is longer than the model's {max_positions} positions; "
            f"truncate to max_length={max_positions}"
        )
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"input_ids must lie in [0, {vocab_size}) for this model's vocabulary, found values in "
            f"[{low}, {high}]; is the tokenizer the model's own?"
        )
    ids = ids.long()

    mask = raw.get("attention_mask")
    if mask is not None:
        mask = _as_tensor(mask, "attention_mask")
        if tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)} but input_ids has {tuple(ids.shape)}; they must match"
            )
        if bool(((mask != 0) & (mask != 1)).any()):  # before any cast: a float 0.4 or 1.7 is not a 0 or a 1
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        mask = mask.long()
        empty = [int(r) for r in (mask.sum(dim=1) == 0).nonzero().flatten()]
        if empty:
            rows = f"row {empty[0]} is" if len(empty) == 1 else f"rows {', '.join(map(str, empty))} are"
            raise ValueError(
                f"attention_mask {rows} all 0 (padding): such a sequence has no token to attend to or to "
                "score, so its hidden states and loss are not defined (a batch of them gives a NaN loss); "
                "drop the row from the batch, or set attention_mask to 1 on at least one of its tokens"
            )

    labels = raw.get("labels")
    if labels is None:
        labels = ids.clone()
    else:
        labels = _as_tensor(labels, "labels")
        _check_integer(labels, "labels")
        if tuple(labels.shape) != tuple(ids.shape):
            raise ValueError(
                f"labels have shape {tuple(labels.shape)} but input_ids has {tuple(ids.shape)}; they must match"
            )
        labels = labels.long().clone()
        wrong = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))]
        if wrong.numel():
            raise ValueError(
                f"labels must be token ids in [0, {vocab_size}) or {IGNORE_INDEX} (not scored), found {int(wrong[0])}; "
                "are they the model's tokenizer's ids?"
            )
    if mask is not None:
        labels[mask == 0] = IGNORE_INDEX
    extras = {k: v for k, v in raw.items() if k not in _KNOWN and isinstance(v, torch.Tensor)}
    return Batch(ids, mask, labels, extras)
