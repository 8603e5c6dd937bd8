"""The vocabulary-sized parameters (the token embedding, the LM head) read a chunk of rows at a
time, and the causal-LM loss accumulated over those chunks.

A perturbed copy of a 50,272-row embedding is 1.2 GB at OPT-175B's width; neither the embedding
stage nor the head needs one whole. The embedding stage needs the rows of the batch's tokens,
the head needs every row but one chunk at a time: its logits for that chunk give each token's
log-sum-exp over the chunk (combined over the chunks at the end), and the chunk is dropped. So
a stage takes each vocabulary-sized parameter as a ``RowSource``, anything that hands out rows
``[start, stop)``: a plain tensor sliced, or (``zo.rows``) rows of ``θ + scale·z`` built on
demand. The chunk boundaries are fixed by the row width alone (``rows_per_chunk``), so every
caller (the runtime, the in-memory reference, an evaluation) multiplies the same shapes and
gets the same bits.

Knows rows, token ids, next-token targets and cross-entropy; nothing of model families, ZO or
devices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from ..planning.memory import loss_piece_tokens, rows_per_chunk
from . import fused_loss
from .batch import IGNORE_INDEX, Batch


@runtime_checkable
class RowSource(Protocol):
    """A [V, W] parameter handed out a block of rows at a time. A block is valid until the next
    call (it may live in a reused buffer)."""

    @property
    def shape(self) -> torch.Size: ...

    def rows(self, start: int, stop: int) -> torch.Tensor: ...


class TensorRows:
    """A whole tensor, sliced."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.tensor[start:stop]


def as_rows(param: torch.Tensor | RowSource) -> RowSource:
    return TensorRows(param) if isinstance(param, torch.Tensor) else param


def chunks(total_rows: int, width: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each chunk of a ``total_rows`` × ``width`` parameter."""
    step = rows_per_chunk(width)
    return [(start, min(start + step, total_rows)) for start in range(0, total_rows, step)]


@dataclass(frozen=True, slots=True)
class TokenLookup:
    """A batch's distinct token ids (sorted), each token's index among them, and for each chunk
    of the embedding holding some of them, which ones: ``(start row, stop row, lo, hi)`` with
    ``distinct[lo:hi]`` in rows ``[start, stop)``. Built on the host with the batch, so that
    gathering rows never waits for the device."""

    distinct: torch.Tensor  # [U] long
    local_ids: torch.Tensor  # [B, T] long: input_ids[b, t] == distinct[local_ids[b, t]]
    spans: tuple[tuple[int, int, int, int], ...]

    @classmethod
    def of(cls, input_ids: torch.Tensor, vocab: int, width: int) -> TokenLookup:
        distinct, local_ids = torch.unique(input_ids, sorted=True, return_inverse=True)
        ends = torch.tensor([stop for _, stop in chunks(vocab, width)])
        where = torch.searchsorted(ends, distinct, right=True).tolist()  # the chunk of each distinct id
        spans, lo = [], 0
        for hi in range(1, len(where) + 1):
            if hi == len(where) or where[hi] != where[lo]:
                start, stop = chunks(vocab, width)[where[lo]]
                spans.append((start, stop, lo, hi))
                lo = hi
        return cls(distinct, local_ids, tuple(spans))

    def to(self, device: torch.device) -> TokenLookup:
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return TokenLookup(move(self.distinct), move(self.local_ids), self.spans)


def gather_rows(source: RowSource, lookup: TokenLookup) -> torch.Tensor:
    """The rows of ``lookup.distinct``, in that order: [U, W], one chunk of ``source`` at a time."""
    out: torch.Tensor | None = None
    for start, stop, lo, hi in lookup.spans:
        block = source.rows(start, stop)
        if out is None:
            out = torch.empty((lookup.distinct.numel(), *block.shape[1:]), dtype=block.dtype, device=block.device)
        torch.index_select(block, 0, lookup.distinct[lo:hi] - start, out=out[lo:hi])
    assert out is not None, "a batch has at least one token"
    return out


def logits_in_chunks(
    logits_of: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor],
    head: dict[str, torch.Tensor | RowSource],
    hidden: torch.Tensor,
) -> torch.Tensor:
    """Every token's logits [..., V]: ``logits_of(params, hidden)`` (the LM head module on one
    chunk of its parameters), chunk after chunk, in the compute dtype."""
    sources = {name: as_rows(p) for name, p in head.items()}
    vocab, width = next(iter(sources.values())).shape[:2]
    parts = [logits_of({n: s.rows(a, b) for n, s in sources.items()}, hidden) for a, b in chunks(vocab, width)]
    return torch.cat(parts, dim=-1)


def loss_over_chunks(
    logits_of: Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor],
    head: dict[str, torch.Tensor | RowSource],
    hidden: torch.Tensor,
    batch: Batch,
) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != -100 from the decoder's last hidden state
    ``hidden`` [B, T, H], never holding every token's logits nor the head's whole (perturbed)
    weight: for each chunk of the vocabulary, its rows once, then its float32 logits for as many
    tokens as fill a piece (``loss_piece_tokens``) at a time, of which each token's log-sum-exp
    over the chunk and its logit at the place of its target (if the chunk held it) are kept; the
    chunks' log-sum-exps are combined at the end. Equal to HF's loss within float rounding (the
    sums run in another order). A few operations per piece: on a GPU the host issues each, and
    a small model's head is paced by them; there each piece's log-sum-exps and target logits are
    one kernel (``fused_loss``), and a piece is four times larger at 16-bit compute."""
    targets = torch.nn.functional.pad(batch.labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    sources = {name: as_rows(p) for name, p in head.items()}
    vocab, width = next(iter(sources.values())).shape[:2]
    bounds, rows = chunks(vocab, width), rows_per_chunk(width)
    fused = fused_loss.usable(flat)  # on a GPU each piece's figures are one kernel: larger pieces
    tokens = flat.shape[0]
    piece = loss_piece_tokens(bounds[0][1] - bounds[0][0], flat.element_size() if fused else 0)
    counted = targets != IGNORE_INDEX
    wanted = torch.where(counted, targets, 0)
    chunk_of, place = wanted // rows, wanted % rows  # which chunk holds each target, and where in it
    log_sum_exp = torch.empty((len(bounds), tokens), dtype=torch.float32, device=flat.device)
    picked = torch.empty((len(bounds), tokens), dtype=torch.float32, device=flat.device)
    for c, (start, stop) in enumerate(bounds):
        params = {n: s.rows(start, stop) for n, s in sources.items()}
        at = place if stop - start == rows else place.clamp(max=stop - start - 1)  # the last chunk may be short
        for lo in range(0, tokens, piece):
            hi = min(tokens, lo + piece)
            logits = logits_of(params, flat[lo:hi])  # [piece, rows of the chunk]
            if fused:  # one kernel, no float32 copy
                fused_loss.lse_and_pick(logits, at[lo:hi], log_sum_exp[c, lo:hi], picked[c, lo:hi])
                continue
            logits = logits.float()
            torch.logsumexp(logits, dim=1, out=log_sum_exp[c, lo:hi])
            torch.gather(logits, 1, at[lo:hi, None], out=picked[c, lo:hi, None])
    target_logit = picked.gather(0, chunk_of[None]).squeeze(0)
    per_token = torch.logsumexp(log_sum_exp, dim=0) - target_logit
    return torch.where(counted, per_token, 0.0).sum() / counted.sum()
