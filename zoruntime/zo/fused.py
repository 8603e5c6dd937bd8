"""The update of a run of 16-bit masters in one pass over memory on a CUDA device (a Triton
kernel): read the weights and z, compute the step in float32, round once (to nearest, or
stochastically with noise drawn in the kernel), write the weights.

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

Without a GPU, tests run the kernels in Triton's interpreter (TRITON_INTERPRET=1 before Triton is
imported) on CPU tensors. Knows float bits, Philox and Triton; nothing of groups, steps or
scheduling (``update`` decides when this runs and with which seed).
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

    @triton.jit(do_not_specialize=["decay", "seed", "first"])  # new each step: one compilation
    def _update_kernel(
        w_ptr, z_ptr, scaled_grad_ptr, n, decay, seed, first,
        DECAY: tl.constexpr, DROPPED: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        exact = tl.load(w_ptr + offsets, mask=inside).to(tl.float32)
        z = tl.load(z_ptr + offsets, mask=inside).to(tl.float32)
        scaled_grad = tl.load(scaled_grad_ptr).to(tl.float32)
        if DECAY:  # noqa: SIM108 (a branch on a constexpr)
            # θ + (−lr·wd·θ + (−lr·g)·z): the step rounded once, then the sum
            exact = exact + (exact * decay + z * scaled_grad)
        else:
            exact = exact + z * scaled_grad
        if DROPPED > 0:  # the noise carries into the kept bits with probability the dropped fraction
            index = (offsets + first).to(tl.uint32)  # the element's index in the group (mod 2^32)
            noise = (tl.randint(seed, index) >> (32 - DROPPED)).to(tl.int32)  # uniform in [0, 2^DROPPED)
            bits = exact.to(tl.int32, bitcast=True) + noise
            exact = (bits & -(1 << DROPPED)).to(tl.float32, bitcast=True)
        tl.store(w_ptr + offsets, exact.to(w_ptr.dtype.element_ty), mask=inside)

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


def update_run(
    weights: torch.Tensor,
    z: torch.Tensor,
    scaled_grad: torch.Tensor,
    decay: float,
    dropped: int,
    seed: int,
    first: int,
) -> None:
    """``weights ← round(weights + (−decay·weights) + scaled_grad·z)`` in place, the arithmetic in
    float32; ``decay`` is lr·wd (0: none); ``dropped`` the float32 bits the weights' type drops,
    rounded stochastically with noise keyed by (``seed``, ``first`` + i) for element i, or 0 to
    round to nearest. ``weights`` and ``z`` flat and contiguous, ``scaled_grad`` a one-element
    float32 tensor beside them."""
    _check(seed, first, weights.numel())
    grid = (triton.cdiv(weights.numel(), BLOCK),)
    _update_kernel[grid](weights, z, scaled_grad, weights.numel(), -decay, seed, first,
                 DECAY=bool(decay), DROPPED=dropped, BLOCK=BLOCK)  # fmt: skip


def rounding_noise(numel: int, dropped: int, seed: int, first: int, device: torch.device) -> torch.Tensor:
    """The noise ``update_run`` adds to elements ``[first, first + numel)`` of a group keyed by
    ``seed`` (int32, uniform in [0, 2^dropped)): for tests, and to check the kernel's draws."""
    _check(seed, first, numel)
    out = torch.empty(numel, dtype=torch.int32, device=device)
    _noise_kernel[(triton.cdiv(numel, BLOCK),)](out, numel, seed, first, DROPPED=dropped, BLOCK=BLOCK)
    return out
