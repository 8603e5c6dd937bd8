"""The GPU's update kernel (``zo/fused.py``): the tensor path's arithmetic and rounding in one
pass, its noise keyed by element, unbiased. On a CPU the kernel runs in Triton's interpreter
(conftest sets TRITON_INTERPRET); with a GPU, on it. Skipped where Triton is not installed."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from zoruntime.zo import fused
from zoruntime.zo.update import DROPPED_BITS, _update_run

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SEED = (1 << 62) + 12345  # a 63-bit seed, as chunk_seed gives


def _exact_inputs(n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights, z and −lr·g whose float32 products and sums are exact, so that the kernel and
    the tensor path agree bit for bit however each contracts its multiply-adds; the sums still
    land between 16-bit values, so rounding has work to do."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randint(-512, 512, (n,), generator=g).float() * 2.0**-9).to(dtype)
    z = (torch.randint(-64, 64, (n,), generator=g).float() * 2.0**-6).to(dtype)
    return w.to(DEVICE), z.to(DEVICE), torch.tensor(-(2.0**-12), device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("decay", [0.0, 2.0**-8])
def test_the_kernel_rounds_as_the_tensor_path_does_given_its_noise(dtype: torch.dtype, decay: float) -> None:
    n, first, dropped = 5000, 77, DROPPED_BITS[dtype]
    w, z, scaled_grad = _exact_inputs(n, dtype, seed=1)
    noise = fused.rounding_noise(n, dropped, SEED, first, DEVICE)
    expected = w.clone()
    _update_run(expected, z, scaled_grad, decay, noise)
    got = w.clone()
    fused.update_run(got, z, scaled_grad, decay, dropped, SEED, first)
    assert torch.equal(got, expected)
    assert not torch.equal(got, w)  # the update did something


def test_round_to_nearest_in_the_kernel_equals_the_tensor_path() -> None:
    """float16 only here: Triton's interpreter narrows to bfloat16 by truncation, not as the
    GPU does (the CUDA tests check bfloat16 on a GPU)."""
    w, z, scaled_grad = _exact_inputs(5000, torch.float16, seed=2)
    expected = w.clone()
    _update_run(expected, z, scaled_grad, 2.0**-8, None)
    got = w.clone()
    fused.update_run(got, z, scaled_grad, 2.0**-8, 0, SEED, 0)
    assert torch.equal(got, expected)


def test_the_noise_is_keyed_by_the_elements_index_in_the_group_not_by_the_run() -> None:
    w, z, scaled_grad = _exact_inputs(3000, torch.bfloat16, seed=3)
    whole = w.clone()
    fused.update_run(whole, z, scaled_grad, 0.0, 16, SEED, 500)
    parts = w.clone()
    for lo, hi in ((0, 1024), (1024, 1030), (1030, 3000)):
        fused.update_run(parts[lo:hi], z[lo:hi], scaled_grad, 0.0, 16, SEED, 500 + lo)
    assert torch.equal(parts, whole)
    other = w.clone()
    fused.update_run(other, z, scaled_grad, 0.0, 16, SEED + 1, 500)
    assert not torch.equal(other, whole)


@pytest.mark.parametrize("dropped", [13, 16])
def test_the_kernels_noise_is_uniform_over_the_dropped_bits(dropped: int) -> None:
    n = 1 << 16
    noise = fused.rounding_noise(n, dropped, SEED, 0, DEVICE).cpu()
    assert noise.dtype == torch.int32 and int(noise.min()) >= 0 and int(noise.max()) < 1 << dropped
    counts = torch.bincount(noise >> (dropped - 4), minlength=16).double()  # 16 equal bins
    assert ((counts - n / 16).abs() < 5 * (n / 16) ** 0.5).all()
    assert torch.equal(noise[100:], fused.rounding_noise(n - 100, dropped, SEED, 100, DEVICE).cpu())


def test_stochastic_rounding_in_the_kernel_is_unbiased() -> None:
    """A step of a third of float16's spacing at 1.0 is lost to rounding to nearest; rounded
    stochastically, element by element (each with its own noise), it survives on average."""
    n = 1 << 15
    w = torch.ones(n, dtype=torch.float16, device=DEVICE)
    z = torch.ones(n, dtype=torch.float16, device=DEVICE)
    step = 2.0**-10 / 3
    scaled_grad = torch.tensor(step, device=DEVICE)
    fused.update_run(w, z, scaled_grad, 0.0, DROPPED_BITS[torch.float16], SEED, 0)
    assert set(w.float().unique().tolist()) == {1.0, 1.0 + 2.0**-10}
    assert abs(float(w.double().mean()) - (1 + step)) < 5 * 0.5 * 2.0**-10 / n**0.5  # five standard deviations


def test_keys_beyond_the_kernels_range_are_refused() -> None:
    w, z, scaled_grad = _exact_inputs(8, torch.float16, seed=4)
    with pytest.raises(ValueError, match="not a 64-bit unsigned int"):
        fused.update_run(w, z, scaled_grad, 0.0, 13, 1 << 64, 0)
    with pytest.raises(ValueError, match=r"keyed by an index below 2\^32"):
        fused.update_run(w, z, scaled_grad, 0.0, 13, SEED, (1 << 32) - 4)


def test_the_kernel_takes_only_16_bit_weights_on_a_gpu() -> None:
    assert not fused.usable(torch.zeros(4, dtype=torch.float16))  # on the CPU: the tensor path
    assert fused.usable(torch.zeros(4, dtype=torch.float16, device=DEVICE)) == (DEVICE.type == "cuda")
    assert not fused.usable(torch.zeros(4, dtype=torch.float32, device=DEVICE))


@pytest.mark.parametrize(("dtype", "rounding"), [(torch.float16, "stochastic"), (torch.bfloat16, "stochastic"),
                                                 (torch.float16, "nearest")])  # fmt: skip
def test_apply_update_runs_the_kernel_per_run_keyed_by_the_groups_rounding_seed(
    dtype: torch.dtype, rounding: str, monkeypatch
) -> None:
    """A group of decayed and undecayed runs: each run that needs float32 arithmetic is one
    ``update_run`` with the group's rounding seed and the run's offset in the group, a plain run
    one multiply-add. On a CPU the kernel path is taken by hand (``usable`` is for GPUs)."""
    from zoruntime.models.groups import GroupLayout, ParamSlice
    from zoruntime.zo.directions import ROUNDING_DIRECTION, DirectionSampler, chunk_seed
    from zoruntime.zo.update import PendingUpdate, Rounding, apply_update

    monkeypatch.setattr(fused, "usable", lambda weights: weights.dtype in DROPPED_BITS)
    slices = (ParamSlice("a", (1000,), 0, True), ParamSlice("b", (500,), 1000, False),
              ParamSlice("c", (1500,), 1500, True))  # fmt: skip
    layout = GroupLayout(4, slices, 3000, dtype)
    w, z, _ = _exact_inputs(3000, dtype, seed=5)
    update = PendingUpdate.from_gradient(
        3, 99, 2.0**-4, 2.0**-3, torch.tensor(2.0**-8, device=DEVICE), Rounding(rounding)
    )
    got = w.clone()
    apply_update(got, z, update, layout, DirectionSampler(DEVICE))
    expected, seed = w.clone(), chunk_seed(99, 4, 0, ROUNDING_DIRECTION)
    dropped = DROPPED_BITS[dtype] if rounding == "stochastic" else 0
    for lo, hi, decay in ((0, 1000, 2.0**-7), (1000, 1500, 0.0), (1500, 3000, 2.0**-7)):
        if dropped or decay:
            fused.update_run(expected[lo:hi], z[lo:hi], update.scaled_grads[0], decay, dropped, seed, lo)
        else:
            expected[lo:hi].addcmul_(z[lo:hi], update.scaled_grads[0])
    assert torch.equal(got, expected) and not torch.equal(got, w)
