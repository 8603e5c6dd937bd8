"""The head's loss kernel (``models/fused_loss.py``): each row's log-sum-exp and target logit in
one pass, as ``torch.logsumexp`` and ``gather`` give them; and the causal-LM loss computed with
it. On a CPU the kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET); with a
GPU, on it. Skipped where Triton is not installed."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from conftest import token_batch, variant_config

from zoruntime.models import adapter_for, fused_loss, random_opt
from zoruntime.models import vocab as vocab_module

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _figures(logits: torch.Tensor, at: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lse = torch.full((logits.shape[0],), float("nan"), device=DEVICE)
    picked = torch.full_like(lse, float("nan"))
    fused_loss.lse_and_pick(logits, at, lse, picked)
    return lse, picked


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_kernel_gives_each_rows_log_sum_exp_and_its_logit_at_the_target(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    rows, columns = 7, 2 * fused_loss.BLOCK + 452  # a last block of columns that is partly masked
    logits = (torch.randn(rows, columns, generator=g) * 8).to(dtype)
    logits[1, 5] = torch.finfo(dtype).max  # a huge logit: the sum is shifted by the row's maximum
    logits[2, :100] = float("-inf")
    at = torch.randint(0, columns, (rows,), generator=g)
    lse, picked = _figures(logits.to(DEVICE), at.to(DEVICE))
    expected = torch.logsumexp(logits.float(), dim=1)
    torch.testing.assert_close(lse.cpu(), expected, rtol=1e-6, atol=0)
    assert torch.equal(picked.cpu(), logits.float().gather(1, at[:, None]).squeeze(1))


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the interpreter's numpy log(0)
def test_a_row_of_minus_infinity_has_a_log_sum_exp_of_minus_infinity() -> None:
    logits = torch.full((2, 300), float("-inf"), dtype=torch.float16, device=DEVICE)
    logits[1] = 0.0
    lse, _ = _figures(logits, torch.zeros(2, dtype=torch.long, device=DEVICE))
    assert lse[0].item() == float("-inf")
    assert lse[1].item() == pytest.approx(torch.log(torch.tensor(300.0)).item(), rel=1e-6)


def test_the_kernel_reads_a_piece_of_rows_in_place() -> None:
    """A slice of a larger buffer's rows (the row stride is the buffer's), outputs that are slices."""
    buffer = torch.randn(10, 700, dtype=torch.float16, device=DEVICE)
    piece, at = buffer[3:8, :500], torch.tensor([0, 499, 7, 250, 3], device=DEVICE)
    lse, picked = torch.zeros(2, 10, device=DEVICE), torch.zeros(2, 10, device=DEVICE)
    fused_loss.lse_and_pick(piece, at, lse[1, 3:8], picked[1, 3:8])
    torch.testing.assert_close(lse[1, 3:8], torch.logsumexp(piece.float(), dim=1), rtol=1e-6, atol=0)
    assert torch.equal(picked[1, 3:8], piece.float().gather(1, at[:, None]).squeeze(1))
    assert not lse[0].any() and not lse[1, :3].any() and not lse[1, 8:].any()  # nothing else written


@pytest.mark.parametrize(
    ("logits", "at", "out", "message"),
    [
        (torch.zeros(4, 6).t(), torch.zeros(6, dtype=torch.long), torch.zeros(6), "columns must be contiguous"),
        (torch.zeros(4, 6), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.float16), "lse must be 4"),
        (torch.zeros(4, 6), torch.zeros(3, dtype=torch.long), torch.zeros(4), "at must hold 4"),
    ],
)
def test_bad_buffers_are_refused_with_what_is_wrong(
    logits: torch.Tensor, at: torch.Tensor, out: torch.Tensor, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        fused_loss.lse_and_pick(logits, at, out, torch.zeros(out.numel()))


def test_the_causal_lm_loss_through_the_kernel_equals_the_tensor_paths_and_hfs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loss over vocabulary chunks and pieces of tokens, each piece's figures from the kernel
    (taken on the CPU here by hand: on a GPU it is taken by itself), within float rounding of
    the tensor path's and of HF's own loss on full logits."""
    config = variant_config("pre_ln_tied", vocab_size=300, hidden_size=32)
    monkeypatch.setattr(vocab_module, "rows_per_chunk", lambda width: 128)  # three chunks, the last short
    monkeypatch.setattr(vocab_module, "loss_piece_tokens", lambda rows, fused_itemsize=0: 5)  # several pieces a chunk
    model = random_opt(config, seed=0)
    adapter = adapter_for(model)
    batch = adapter.validate(token_batch(config, rows=3, length=12))
    ends = adapter.groups()[0][1]
    hidden = torch.randn(3, 12, config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tensor_path = adapter.head_loss(ends, hidden, batch)
        monkeypatch.setattr(fused_loss, "usable", lambda tensor: True)
        kernel_path = adapter.head_loss(ends, hidden, batch)
        hf = adapter.causal_lm_loss(adapter.head(ends, hidden), batch)
    torch.testing.assert_close(kernel_path, tensor_path, rtol=1e-6, atol=0)
    torch.testing.assert_close(kernel_path, hf, rtol=1e-6, atol=0)
    assert not torch.equal(kernel_path, torch.zeros(()))
