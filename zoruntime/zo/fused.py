"""The update of a group's 16-bit masters in one pass over memory on a CUDA device (a Triton
kernel, one launch for every run of the group's trainable parameters): read the weights and z,
compute the step in float32, round once (to nearest, or stochastically with noise drawn in the
kernel), write the weights.

Done with tensor operations (``update._update_run``), a stochastic update makes seven passes
over float32 temporaries and draws its noise a piece at a time: about 50 bytes an element and
hundreds of operations for the host to issue per block. On an H200 that took the compute task of
an opt-13b block from 7.6 ms to 12.9 ms, longer than the block's upload. The kernel reads and
writes the 6 bytes an element a plain update does.

Its noise is Philox (Triton's ``randint``) keyed by the group's rounding seed and each element's
index in the group, so it does not depend on how the group is cut into runs, spans or units; it
is not the tensor path's noise (a generator per piece), so a CUDA run with Triton and one
without, or on a CPU, round differently, as their directions already differ. The runtime and the
reference call the same function on the same device and stay bitwise equal.

One launch per group (or span of one), not one per run: a block's dozen runs (each weight
decayed, each bias and norm not) were a dozen launches, 0.26 ms of an H200 host's time for an
opt-13b block's update, most of it in Triton's launcher. Without a GPU, tests run the kernels in
Triton's interpreter (TRITON_INTERPRET=1 before Triton is imported) on CPU tensors. Knows float
bits, Philox, Triton and runs of a flat buffer; nothing of layouts, steps or scheduling
(``update`` decides when this runs and with which seed).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU build of torch comes without Triton: the tensor path runs
    triton = None

BLOCK = 1024  # elements per program


def usable(weights: torch.Tensor) -> bool:
    """Whether the kernel updates these weights: 16-bit, on a CUDA device, with Triton there."""
    return triton is not None and weights.is_cuda and weights.dtype in (torch.float16, torch.bfloat16)


if triton is not None:

    @triton.jit(do_not_specialize=["decay", "seed", "lo", "hi", "offset"])  # new each call: one compilation
    def _update_kernel(
        w_ptr, z_ptr, scaled_grad_ptr, runs_ptr, runs, lo, hi, offset, decay, seed, changed_ptr,
        DECAY: tl.constexpr, DROPPED: tl.constexpr, COUNT: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        index = lo + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # the element's index in the group
        in_run = tl.zeros((BLOCK,), tl.int1)
        decayed = tl.zeros((BLOCK,), tl.int1)
        for r in range(runs):  # (start, end, decayed) of each run the update touches, a few a group
            here = (index >= tl.load(runs_ptr + 3 * r)) & (index < tl.load(runs_ptr + 3 * r + 1))
            in_run = in_run | here
            decayed = decayed | (here & (tl.load(runs_ptr + 3 * r + 2) != 0))
        inside = in_run & (index < hi)  # frozen parameters between runs are left as they are
        before = tl.load(w_ptr + index, mask=inside)
        exact = before.to(tl.float32)
        z = tl.load(z_ptr + (index - offset), mask=inside).to(tl.float32)
        scaled_grad = tl.load(scaled_grad_ptr).to(tl.float32)
        step = z * scaled_grad
        if DECAY:  # θ + (−lr·wd·θ + (−lr·g)·z): the step rounded once, then the sum
            step = tl.where(decayed, exact * decay + z * scaled_grad, step)
        exact = exact + step
        if DROPPED > 0:  # the noise carries into the kept bits with probability the dropped fraction
            noise = (tl.randint(seed, index.to(tl.uint32)) >> (32 - DROPPED)).to(tl.int32)  # in [0, 2^DROPPED)
            bits = exact.to(tl.int32, bitcast=True) + noise
            exact = (bits & -(1 << DROPPED)).to(tl.float32, bitcast=True)
        after = exact.to(w_ptr.dtype.element_ty)
        tl.store(w_ptr + index, after, mask=inside)
        if COUNT:  # how many elements the update changed, added to one counter
            tl.atomic_add(changed_ptr, tl.sum((inside & (after != before)).to(tl.int64), 0))

    @triton.jit(do_not_specialize=["seed", "first"])
    def _noise_kernel(out_ptr, n, seed, first, DROPPED: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        index = (offsets + first).to(tl.uint32)
        noise = (tl.randint(seed, index) >> (32 - DROPPED)).to(tl.int32)  # as _update_kernel draws it
        tl.store(out_ptr + offsets, noise, mask=offsets < n)


def _check(seed: int, first: int, numel: int) -> None:
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"rounding seed {seed} is not a 64-bit unsigned int")
    if first < 0 or first + numel > 1 << 32:
        raise ValueError(f"elements [{first}, {first + numel}) of a group: the noise is keyed by an index below 2^32")


Runs = tuple[tuple[int, int, bool], ...]
"""``(start, end, decayed)`` of each run of trainable elements of a group (``GroupLayout.update_ranges``)."""

_RUN_TABLES: dict[tuple[Runs, torch.device], torch.Tensor] = {}
"""Each group layout's runs as the kernel reads them, on each device: copied there once."""


def _run_table(runs: Runs, device: torch.device) -> torch.Tensor:
    table = _RUN_TABLES.get((runs, device))
    if table is None:
        flat = [value for start, end, decayed in runs for value in (start, end, int(decayed))]
        host = torch.tensor(flat, dtype=torch.int64)  # pinned on a GPU: the copy does not stop the host
        table = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
        _RUN_TABLES[(runs, device)] = table
    return table


def update_span(
    weights: torch.Tensor,
    z: torch.Tensor,
    scaled_grad: torch.Tensor,
    runs: Runs,
    decay: float,
    dropped: int,
    seed: int,
    offset: int = 0,
    changed: torch.Tensor | None = None,
) -> None:
    """``θ ← round(θ + (−decay·θ where decayed) + scaled_grad·z)`` in place, the arithmetic in
    float32, on the elements of ``weights`` (a group's whole flat buffer) that lie in one of
    ``runs`` and in z's span: ``z`` holds the group's direction at ``[offset, offset + z.numel())``.
    One launch for the whole span, however many runs (a block has a dozen: each weight decayed,
    each bias and norm not). ``decay`` is lr·wd; ``dropped`` the float32 bits the weights' type
    drops, rounded stochastically with noise keyed by (``seed``, the element's index in the
    group), or 0 to round to nearest. ``scaled_grad`` is a one-element float32 tensor beside them;
    ``changed``, a one-element int64 tensor there, gains how many elements the update changed."""
    span_end = offset + z.numel()
    lo = max(min((start for start, _, _ in runs), default=span_end), offset)
    hi = min(max((end for _, end, _ in runs), default=offset), span_end)
    if lo >= hi:
        return
    _check(seed, lo, hi - lo)
    grid = (triton.cdiv(hi - lo, BLOCK),)
    decays = bool(decay) and any(decayed for _, _, decayed in runs)
    count = changed is not None
    _update_kernel[grid](weights, z, scaled_grad, _run_table(runs, weights.device), len(runs), lo, hi, offset,
                         -decay, seed, changed if count else scaled_grad, DECAY=decays, DROPPED=dropped, COUNT=count,
                         BLOCK=BLOCK)  # fmt: skip


def rounding_noise(numel: int, dropped: int, seed: int, first: int, device: torch.device) -> torch.Tensor:
    """The noise ``update_span`` adds to elements ``[first, first + numel)`` of a group keyed by
    ``seed`` (int32, uniform in [0, 2^dropped)): for tests, and to check the kernel's draws."""
    _check(seed, first, numel)
    out = torch.empty(numel, dtype=torch.int32, device=device)
    _noise_kernel[(triton.cdiv(numel, BLOCK),)](out, numel, seed, first, DROPPED=dropped, BLOCK=BLOCK)
    return out
