"""Each token's log-sum-exp over a piece of logits and its logit at its target, in one CUDA
kernel (Triton): the inner step of the head's causal-LM loss (``vocab.loss_over_chunks``).

With tensor operations a piece costs a float32 copy of its logits and about eight kernel
launches (the copy, ``logsumexp``'s max, subtraction, exponent, sum, logarithm and addition,
the gather); the host issues each, and a small model's head is paced by them (an opt-1.3b
probe's loss is 56 pieces: 7.7 ms of host time against 3.4 ms on an H200's GPU). The kernel
reads the 16-bit logits twice (the row's maximum, then the sum of exponentials shifted by it),
computes in float32, and writes each row's two figures: one launch, no float32 copy.

Its sums run in another order than ``torch.logsumexp``'s, so a piece's figures differ from the
tensor path's in the last bits; the runtime and the reference call the same function on the same
device and stay bitwise equal, as with the update kernel (``zo/fused.py``). Without a GPU, tests
run the kernel in Triton's interpreter on CPU tensors. Knows float rows and Triton; nothing of
vocabularies, chunks or models.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU build of torch comes without Triton: the tensor path runs
    triton = None

BLOCK = 1024  # columns a program reads at a time


def usable(tensor: torch.Tensor) -> bool:
    """Whether the kernel computes the figures of logits beside ``tensor``: on a CUDA device, with
    Triton there."""
    return triton is not None and tensor.is_cuda


if triton is not None:

    @triton.jit
    def _lse_pick_kernel(logits_ptr, row_stride, columns, at_ptr, lse_ptr, picked_ptr, BLOCK: tl.constexpr):
        row = logits_ptr + tl.program_id(0).to(tl.int64) * row_stride
        highest = tl.full((), float("-inf"), tl.float32)
        for start in range(0, columns, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            x = tl.load(row + offsets, mask=offsets < columns, other=float("-inf")).to(tl.float32)
            highest = tl.maximum(highest, tl.max(x, 0))
        shift = tl.where(highest == float("-inf"), 0.0, highest)  # every logit -inf: the sum is 0, log -inf
        total = tl.zeros((), tl.float32)
        for start in range(0, columns, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            x = tl.load(row + offsets, mask=offsets < columns, other=float("-inf")).to(tl.float32)
            total += tl.sum(tl.exp(x - shift), 0)
        tl.store(lse_ptr + tl.program_id(0), tl.log(total) + shift)
        target = tl.load(at_ptr + tl.program_id(0))
        tl.store(picked_ptr + tl.program_id(0), tl.load(row + target).to(tl.float32))


def lse_and_pick(logits: torch.Tensor, at: torch.Tensor, lse: torch.Tensor, picked: torch.Tensor) -> None:
    """``lse[i] = log Σ_j exp(logits[i, j])`` and ``picked[i] = logits[i, at[i]]``, both float32,
    for each row of ``logits`` [rows, columns] (any float type, columns contiguous); ``at`` holds
    a column per row (int64, each in range: not checked on the device), ``lse`` and ``picked`` are
    contiguous float32 tensors of ``rows`` elements, written in place."""
    rows, columns = logits.shape
    if logits.stride(1) != 1:
        raise ValueError(f"the logits' columns must be contiguous (strides {logits.stride()})")
    for name, out in (("lse", lse), ("picked", picked)):
        if out.dtype != torch.float32 or out.numel() != rows or not out.is_contiguous():
            raise ValueError(f"{name} must be {rows} contiguous float32 values, not {out.dtype} {tuple(out.shape)}")
    if at.numel() != rows or not at.is_contiguous():
        raise ValueError(f"at must hold {rows} contiguous columns, one a row, not {tuple(at.shape)}")
    if rows:
        _lse_pick_kernel[(rows,)](logits, logits.stride(0), columns, at, lse, picked, BLOCK=BLOCK)
