"""The ZO arithmetic on flat group buffers: directions, perturbed copies, projected gradient,
update (of one direction or the sum of several), and how the update is rounded.

Every place that perturbs or updates weights (the in-memory reference, every backend of the
runtime, replay) calls these functions, so the same inputs give the same bits everywhere. The
master weights are never perturbed in place: a perturbed copy is written into a scratch
buffer. Frozen parameters have z = 0 and are never updated. Knows a group's layout (which
elements are trainable and decayed), nothing about models, devices or scheduling.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch

from ..models.groups import GroupLayout, ParamSlice
from ..planning.memory import UPDATE_SPAN_ELEMENTS
from . import fused
from .directions import ROUNDING_DIRECTION, DirectionSampler, DrawnChunk, chunk_seed, chunk_seeds

_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def perturb_into(out: torch.Tensor, weights: torch.Tensor, z: torch.Tensor, scale: float) -> torch.Tensor:
    """``out = weights + scale·z`` for flat tensors; ``weights`` is left untouched. Each element's
    own arithmetic, wherever it lies, so a copy perturbed in pieces (the kept group's spans and
    rows) equals one perturbed whole.

    On a CPU, PyTorch's add with ``alpha`` into a 16-bit tensor rounds some elements differently
    in its vectorised body and in its scalar tail (a bf16 buffer of 61 rows of 27: about 40 of
    1,647 elements differ between a whole add and one a row at a time). There the sum is taken in
    float32, a multiply and an add (each exactly rounded, wherever the element lies), a span of
    ``UPDATE_SPAN_ELEMENTS`` at a time, and rounded once to ``out``'s dtype. On CUDA one kernel
    applies one function to every element."""
    # out, weights, z: [numel]
    if out.dtype not in _SIXTEEN_BIT or out.device.type != "cpu":
        return torch.add(weights, z, alpha=scale, out=out)
    for start in range(0, out.numel(), UPDATE_SPAN_ELEMENTS):
        span = slice(start, start + UPDATE_SPAN_ELEMENTS)
        out[span].copy_(torch.mul(z[span].float(), scale).add_(weights[span]))
    return out


class PerturbedRows:
    """Rows of one parameter of a group as ``θ + scale·z`` (z the step's direction ``direction``;
    ``scale`` None: θ itself, in ``out``'s dtype), built on demand into ``out`` (one chunk of
    rows; a call overwrites the last), z drawn into ``z``: a ``models.vocab.RowSource`` whose rows
    equal, bitwise, those of a whole perturbed copy of the group."""

    def __init__(
        self,
        weights: torch.Tensor,
        piece: ParamSlice,
        layout: GroupLayout,
        sampler: DirectionSampler,
        seed: int,
        scale: float | None,
        z: torch.Tensor,
        out: torch.Tensor,
        direction: int = 0,
        drawn: DrawnChunk | None = None,
    ) -> None:
        self.weights, self.piece, self.layout, self.sampler = weights, piece, layout, sampler
        self.seed, self.scale, self.z, self.out, self.direction = seed, scale, z, out, direction
        self.drawn = drawn
        self.width = piece.numel // piece.shape[0]

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.piece.shape)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        first, count = self.piece.offset + start * self.width, (stop - start) * self.width
        out = self.out[:count]
        if self.scale is None:
            out.copy_(self.weights[first : first + count])
        else:
            z = draw_direction(self.sampler, self.seed, self.layout, self.z[:count], first, self.direction, self.drawn)
            perturb_into(out, self.weights[first : first + count], z, self.scale)
        return out.view(stop - start, *self.piece.shape[1:])


def projected_gradient(loss_plus: torch.Tensor, loss_minus: torch.Tensor, eps: float) -> torch.Tensor:
    """``g = (f(θ+εz) − f(θ−εz)) / 2ε`` as a 0-d fp32 tensor on the losses' device (no host sync)."""
    return (loss_plus.float() - loss_minus.float()) / (2.0 * eps)


class Rounding(StrEnum):
    """How an update's exact (float32) result becomes a 16-bit master weight. Float32 masters
    always round to nearest: there the result is already float32."""

    NEAREST = "nearest"
    STOCHASTIC = "stochastic"  # up or down with probability by distance: unbiased, so small updates add up


ROUNDING_PIECE = 1 << 20
"""Elements per piece of an update's stochastic rounding: the unit whose noise one generator
draws (keyed by step seed, group and piece). Part of the scheme: another length rounds otherwise."""

DROPPED_BITS = {torch.float16: 13, torch.bfloat16: 16}
"""float32 mantissa bits each 16-bit type drops (23 − 10 and 23 − 7)."""


@dataclass(frozen=True, slots=True)
class PendingUpdate:
    """An update computed at ``step`` and not yet applied to every group:
    ``θ ← θ − lr·(Σ_d c_d·z_d + wd·θ)`` over the step's directions ``d``.

    ``scaled_grads`` holds ``−lr·c_d``, one per direction: a 1-d fp32 tensor that may stay on
    the compute device (with one direction, ``c_0`` is MeZO's projected gradient g).
    """

    step: int
    seed: int
    lr: float
    weight_decay: float
    scaled_grads: torch.Tensor
    rounding: Rounding = Rounding.NEAREST

    @classmethod
    def from_gradient(
        cls,
        step: int,
        seed: int,
        lr: float,
        weight_decay: float,
        grad: torch.Tensor,
        rounding: Rounding = Rounding.NEAREST,
    ) -> PendingUpdate:
        """The update of coefficients ``grad``: one per direction (a 0-d tensor: one direction)."""
        return cls(step, seed, lr, weight_decay, grad.reshape(-1) * -lr, Rounding(rounding))

    @property
    def directions(self) -> int:
        return self.scaled_grads.numel()


class UpdateProgress:
    """How far one update of one group has got: every trainable element below ``done`` holds it.

    An update that raises part-way (out of memory for a float32 temporary, say) has changed the
    elements before ``done`` and no others. Given the same progress again, ``update_group`` goes
    on from there instead of applying the update twice to them; each element's arithmetic is its
    own, so the group ends bitwise as if nothing had failed. Only an authoritative copy needs
    one: a streamed group's slot is a copy, uploaded again from its master."""

    def __init__(self, step: int) -> None:
        self.step = step  # the update's step
        self.done = 0


def draw_direction(
    sampler: DirectionSampler,
    seed: int,
    layout: GroupLayout,
    out: torch.Tensor,
    offset: int = 0,
    direction: int = 0,
    drawn: DrawnChunk | None = None,
) -> torch.Tensor:
    """Elements ``[offset, offset + out.numel())`` of direction ``direction`` of ``layout``'s
    group in the step whose seed is ``seed``, drawn into ``out``: the sampler's draw (``drawn``:
    where a chunk drawn for part of it is kept), zero on frozen parameters (so they are neither
    perturbed nor updated, and every other element is what it would be with nothing frozen)."""
    sampler.draw(seed, layout.group, out, direction=direction, offset=offset, group_numel=layout.numel, drawn=drawn)
    end = offset + out.numel()
    for start, stop in layout.frozen_ranges:
        if start < end and stop > offset:
            out[max(start, offset) - offset : min(stop, end) - offset].zero_()
    return out


def update_group(
    weights: torch.Tensor,
    update: PendingUpdate,
    layout: GroupLayout,
    sampler: DirectionSampler,
    z: torch.Tensor,
    step: torch.Tensor | None = None,
    changed: ChangeCount | None = None,
    progress: UpdateProgress | None = None,
) -> None:
    """Apply ``update`` to a group's flat ``weights``: the one way every runner updates.

    One direction: z drawn into ``z`` (the masters' dtype) and ``apply_update``, the whole group
    at once when ``z`` holds it, else a span of ``z.numel()`` elements at a time. Several: a span
    of ``step.numel()`` elements at a time (``step``: float32), each direction's z drawn into
    ``z``, their sum ``Σ_d −lr·c_d·z_d`` accumulated in ``step`` in direction order, then applied.
    Every element's arithmetic is its own, so the span lengths do not change the bits, and an
    update that failed part-way goes on where its ``progress`` says (``UpdateProgress``)."""
    if update.directions == 1:
        span = min(z.numel(), layout.numel)
    else:
        if step is None or step.dtype != torch.float32:
            raise ValueError("an update of several directions needs a float32 step buffer")
        span = min(step.numel(), z.numel(), layout.numel)
        one = torch.ones((), dtype=torch.float32, device=weights.device)  # the sum is the step itself
    counter, sample = changed.watch(layout, weights, 0, layout.numel) if changed is not None else (None, None)
    for start in range(0, layout.numel, span):
        count = min(span, layout.numel - start)
        if progress is not None and start + count <= progress.done:
            continue  # applied before a failure
        if update.directions == 1:
            direction = draw_direction(sampler, update.seed, layout, z[:count], start)
            apply_update(weights, direction, update, layout, sampler, offset=start, counter=counter, progress=progress)
            continue
        assert step is not None
        total = step[:count]
        for d in range(update.directions):
            direction = draw_direction(sampler, update.seed, layout, z[:count], start, d)
            if d == 0:  # widened exactly, then scaled in float32
                total.copy_(direction).mul_(update.scaled_grads[0])
            else:
                total.addcmul_(direction, update.scaled_grads[d])
        apply_update(weights, total, update, layout, sampler, offset=start, scale=one, counter=counter,
                     progress=progress)  # fmt: skip
    if changed is not None and sample is not None:
        changed.after(weights, sample)


class ChangeCount:
    """Counts how many elements the applied updates changed, on the device (reading the count is
    the caller's one host sync). With tensor operations it samples: before an update ``SAMPLE``
    trainable elements of the group, spread evenly, are copied; after it, those that differ are
    counted. The update kernel counts every element it writes as it goes (``watch`` hands it the
    counter): no operations of its own to issue."""

    SAMPLE = 4096

    def __init__(self) -> None:
        self._indices: dict[tuple[int, torch.device], torch.Tensor] = {}
        self.changed: torch.Tensor | None = None
        self._counter: torch.Tensor | None = None  # the kernel's count, made on the device by its first update
        self.sampled = 0

    def watch(
        self, layout: GroupLayout, weights: torch.Tensor, lo: int, hi: int
    ) -> tuple[torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]:
        """How an update of elements ``[lo, hi)`` of the group counts what it changes: on a GPU with
        Triton, the counter the update kernel adds to (each trainable element counted); else a
        sample taken now, for ``after`` to compare."""
        if fused.usable(weights):
            if self._counter is None:
                self._counter = torch.zeros(1, dtype=torch.int64, device=weights.device)
            self.sampled += _trainable_between(layout, lo, hi)
            return self._counter, None
        key = (layout.group, weights.device)
        if key not in self._indices:
            self._indices[key] = _spread_over(layout.update_ranges, self.SAMPLE).to(weights.device)
        index = self._indices[key]
        return None, (index, weights[index])

    def after(self, weights: torch.Tensor, sample: tuple[torch.Tensor, torch.Tensor]) -> None:
        index, old = sample
        differs = (weights[index] != old).sum()
        self.changed = differs if self.changed is None else self.changed + differs
        self.sampled += index.numel()

    def clear(self) -> None:
        """Forget what was counted (without reading it): a new counter for the next update, made
        on its stream, rather than zeroing this one from the caller's."""
        self.changed, self._counter, self.sampled = None, None, 0

    def take(self) -> float | None:
        """The fraction changed since the last ``take`` (None if no update was applied)."""
        counts = [c for c in (self.changed, self._counter) if c is not None]
        if not counts or not self.sampled:
            return None
        fraction = sum(float(c.sum()) for c in counts) / self.sampled
        self.clear()
        return fraction


def _spread_over(runs: tuple[tuple[int, int, bool], ...], count: int) -> torch.Tensor:
    """About ``count`` flat indices spread evenly over the elements of ``runs`` (start, end, _),
    without listing every element."""
    lengths = torch.tensor([end - start for start, end, _ in runs])
    total = int(lengths.sum())
    taken = min(count, total)
    positions = torch.arange(taken, dtype=torch.int64) * total // taken  # among the runs' elements, evenly
    ends = torch.cumsum(lengths, 0)
    run = torch.searchsorted(ends, positions, right=True)
    starts = torch.tensor([start for start, _, _ in runs])
    return starts[run] + positions - (ends[run] - lengths[run])


def apply_update(
    weights: torch.Tensor,
    z: torch.Tensor,
    update: PendingUpdate,
    layout: GroupLayout,
    sampler: DirectionSampler,
    changed: ChangeCount | None = None,
    offset: int = 0,
    scale: torch.Tensor | None = None,
    counter: torch.Tensor | None = None,
    progress: UpdateProgress | None = None,
) -> None:
    """``θ ← θ − lr·(g·z + wd·θ)`` in place on the group's trainable parameters (decay only on
    those that take it), computed in float32 and rounded once to the masters' dtype. ``z`` holds
    elements ``[offset, offset + z.numel())`` of the direction, and only those are updated.
    ``scale`` multiplies z in place of the update's one ``−lr·g``: ``update_group`` passes 1 with
    z the float32 sum ``Σ_d −lr·c_d·z_d`` of several directions.

    The decay is folded into the step before rounding, never a multiplication by
    ``1 − lr·wd`` (which float32 cannot hold near 1 at lr·wd of 1e-7 and below). 16-bit masters
    round to nearest or stochastically (``update.rounding``), with noise from
    ``sampler.rounding_noise`` keyed by (step seed, group, piece of ``ROUNDING_PIECE``); on a
    GPU with Triton, the whole span is one kernel (``fused``), its noise keyed by (step seed,
    group, element), and it adds the elements it changed to ``counter`` where given (``changed``
    counts there too). ``progress``: elements below its ``done`` are left as they are, and it
    advances as the update goes (``UpdateProgress``)."""
    # weights, z: [numel] flat, z zero on frozen parameters
    stochastic = update.rounding is Rounding.STOCHASTIC
    if stochastic and weights.dtype not in DROPPED_BITS:
        raise ValueError(f"stochastic rounding is for 16-bit masters; these are {weights.dtype}: use nearest")
    sample = None
    if changed is not None:
        counter, sample = changed.watch(layout, weights, offset, offset + z.numel())
    if scale is not None:
        scaled_grad = scale
    elif update.directions == 1:
        scaled_grad = update.scaled_grads[0].to(device=weights.device)
    else:
        raise ValueError(f"an update of {update.directions} directions is applied by update_group, not apply_update")
    decay = update.lr * update.weight_decay
    dropped = DROPPED_BITS[weights.dtype] if stochastic else 0
    if fused.usable(weights):  # on a GPU with Triton: one pass over the span, its noise drawn in the kernel
        group_seed = chunk_seed(update.seed, layout.group, 0, ROUNDING_DIRECTION)  # keyed by element
        fused.update_span(weights, z, scaled_grad, layout.update_ranges, decay, dropped, group_seed, offset, counter)
        if progress is not None:  # one launch: the span is updated whole or not at all
            progress.done = offset + z.numel()
    else:
        _update_runs(weights, z, scaled_grad, update, layout, sampler, offset, decay, dropped, progress)
    if changed is not None and sample is not None:
        changed.after(weights, sample)


def _trainable_between(layout: GroupLayout, lo: int, hi: int) -> int:
    """The group's trainable elements in ``[lo, hi)``."""
    return sum(max(0, min(end, hi) - max(start, lo)) for start, end, _ in layout.update_ranges)


def _update_runs(
    weights: torch.Tensor,
    z: torch.Tensor,
    scaled_grad: torch.Tensor,
    update: PendingUpdate,
    layout: GroupLayout,
    sampler: DirectionSampler,
    offset: int,
    decay: float,
    dropped: int,
    progress: UpdateProgress | None,
) -> None:
    """``apply_update`` with tensor operations: a run at a time, a span of float32 temporaries at a
    time, ``progress`` (where given) advanced after each."""
    span_end = offset + z.numel()
    noise = _SpanNoise(sampler, update, layout, dropped, offset, span_end) if dropped else None
    first = max(offset, progress.done) if progress is not None else offset  # below it: applied before a failure
    for run_start, run_end, decayed in layout.update_ranges:
        start, end = max(run_start, first), min(run_end, span_end)
        if start >= end:
            continue
        run_decay = decay if decayed else 0.0
        if weights.dtype == torch.float32 and not run_decay:  # one fused multiply-add over the run, no temporaries
            weights[start:end].addcmul_(z[start - offset : end - offset], scaled_grad)
            if progress is not None:
                progress.done = end
            continue
        lo = start
        while lo < end:  # spans bound the float32 temporaries
            hi = min(end, (lo // UPDATE_SPAN_ELEMENTS + 1) * UPDATE_SPAN_ELEMENTS)
            run_noise = noise.between(lo, hi) if noise is not None else None
            _update_run(weights[lo:hi], z[lo - offset : hi - offset], scaled_grad, run_decay, run_noise)
            if progress is not None:
                progress.done = hi
            lo = hi


_NO_NOISE = torch.empty(0, dtype=torch.int32)


class _SpanNoise:
    """Stochastic rounding's noise for one span of ``UPDATE_SPAN_ELEMENTS`` at a time, each piece
    of ``ROUNDING_PIECE`` drawn whole (as its key fixes it) into its place, and only once: runs
    that share a piece share its draw."""

    def __init__(
        self, sampler: DirectionSampler, update: PendingUpdate, layout: GroupLayout, bits: int, lo: int, hi: int
    ) -> None:
        self.sampler, self.update, self.layout, self.bits = sampler, update, layout, bits
        self.span, self.buffer, self.drawn = -1, _NO_NOISE, set[int]()  # no span yet
        pieces = range(lo // ROUNDING_PIECE, (hi - 1) // ROUNDING_PIECE + 1)  # those elements [lo, hi) lie in
        chunk_seeds(update.seed, layout.group, pieces, ROUNDING_DIRECTION)  # hashed at once, for rounding_noise

    def between(self, lo: int, hi: int) -> torch.Tensor:
        """The noise of elements ``[lo, hi)`` of the group, which lie in one span."""
        span = lo // UPDATE_SPAN_ELEMENTS
        span_start = span * UPDATE_SPAN_ELEMENTS
        if span != self.span:
            length = min(UPDATE_SPAN_ELEMENTS, self.layout.numel - span_start)
            self.span, self.drawn = span, set()
            self.buffer = torch.empty(length, dtype=torch.int32, device=self.sampler.device)
        for piece in range(lo // ROUNDING_PIECE, (hi - 1) // ROUNDING_PIECE + 1):
            if piece not in self.drawn:
                first = piece * ROUNDING_PIECE
                length = min(ROUNDING_PIECE, self.layout.numel - first)
                out = self.buffer[first - span_start : first - span_start + length]
                self.sampler.rounding_noise(self.update.seed, self.layout.group, piece, length, self.bits, out=out)
                self.drawn.add(piece)
        return self.buffer[lo - span_start : hi - span_start]


def _update_run(
    w: torch.Tensor, z: torch.Tensor, scaled_grad: torch.Tensor, decay: float, noise: torch.Tensor | None
) -> None:
    if w.dtype == torch.float32:  # (16-bit: a float32 scaled_grad would be rounded to 16 bits first)
        if decay:  # θ + (−lr·g·z − lr·wd·θ): one rounding of the step, one of the sum
            step = torch.mul(w, -decay).addcmul_(z, scaled_grad)
            w.add_(step)
        else:  # one fused multiply-add, rounded once
            w.addcmul_(z, scaled_grad)
        return
    exact, z = w.float(), z.float()  # the step and the sum in float32, then one rounding to the masters' dtype
    if decay:  # (z in float32 first: an op of mixed dtypes may round its vector body and its tail apart)
        exact.add_(torch.mul(exact, -decay).addcmul_(z, scaled_grad))
    else:
        exact.addcmul_(z, scaled_grad)
    w.copy_(exact if noise is None else _stochastic_round(exact, noise, DROPPED_BITS[w.dtype]))


def _stochastic_round(exact: torch.Tensor, noise: torch.Tensor, dropped: int) -> torch.Tensor:
    """``exact`` (float32, overwritten) with the bits the 16-bit type drops replaced by a random
    choice between rounding down and up: ``noise``, uniform in [0, 2^dropped), is added to the
    bit pattern and the dropped bits cleared, which carries into the kept bits with probability
    equal to the dropped fraction. So the 16-bit value is ``exact`` on average (a value the
    type holds is unchanged). Exact for bfloat16 everywhere and for float16 in its normal range;
    below 2^-14 float16's spacing is fixed and the result is rounded to nearest once more."""
    exact.view(torch.int32).add_(noise).bitwise_and_(-(1 << dropped))  # sign and magnitude: both signs alike
    return exact
