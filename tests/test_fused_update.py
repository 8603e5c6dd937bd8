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
    got = torch.cat([torch.zeros(first, dtype=dtype, device=DEVICE), w])  # a group whose run starts at first
    fused.update_span(got, z, scaled_grad, ((first, first + n, True),), decay, dropped, SEED, offset=first)
    assert torch.equal(got[first:], expected) and not got[:first].any()
    assert not torch.equal(got[first:], w)  # the update did something


def test_round_to_nearest_in_the_kernel_equals_the_tensor_path() -> None:
    """float16 only here: Triton's interpreter narrows to bfloat16 by truncation, not as the
    GPU does (the CUDA tests check bfloat16 on a GPU)."""
    w, z, scaled_grad = _exact_inputs(5000, torch.float16, seed=2)
    expected = w.clone()
    _update_run(expected, z, scaled_grad, 2.0**-8, None)
    got = w.clone()
    fused.update_span(got, z, scaled_grad, ((0, 5000, True),), 2.0**-8, 0, SEED)
    assert torch.equal(got, expected)


def test_the_noise_is_keyed_by_the_elements_index_in_the_group_not_by_the_span() -> None:
    w, z, scaled_grad = _exact_inputs(3000, torch.bfloat16, seed=3)
    runs = ((0, 3000, False),)
    whole = w.clone()
    fused.update_span(whole, z, scaled_grad, runs, 0.0, 16, SEED)
    parts = w.clone()
    for lo, hi in ((0, 1024), (1024, 1030), (1030, 3000)):  # z a span at a time, as the kept group's
        fused.update_span(parts, z[lo:hi], scaled_grad, runs, 0.0, 16, SEED, offset=lo)
    assert torch.equal(parts, whole)
    other = w.clone()
    fused.update_span(other, z, scaled_grad, runs, 0.0, 16, SEED + 1)
    assert not torch.equal(other, whole)


def test_one_launch_updates_every_run_and_leaves_frozen_elements_alone() -> None:
    """Runs decayed and not, a frozen stretch between them, a span that starts and ends inside
    runs: each element as a launch for its run alone updates it, the rest untouched."""
    w, z, scaled_grad = _exact_inputs(4000, torch.float16, seed=6)
    runs = ((0, 1000, True), (1000, 1300, False), (2000, 4000, True))  # 1300 .. 2000 frozen
    lo, hi = 500, 3500
    got = w.clone()
    fused.update_span(got, z[lo:hi], scaled_grad, runs, 2.0**-7, 13, SEED, offset=lo)
    expected = w.clone()
    for start, end, decayed in ((500, 1000, True), (1000, 1300, False), (2000, 3500, True)):
        fused.update_span(expected, z[start:end], scaled_grad, ((start, end, decayed),), 2.0**-7, 13, SEED,
                          offset=start)  # fmt: skip
    assert torch.equal(got, expected)
    unchanged = torch.cat([got[:lo] == w[:lo], got[1300:2000] == w[1300:2000], got[hi:] == w[hi:]])
    assert unchanged.all() and not torch.equal(got[lo:1300], w[lo:1300])
    decayed_only = w.clone()  # decay reaches the decayed runs alone: z = 0 leaves the others as they were
    fused.update_span(decayed_only, torch.zeros_like(z), scaled_grad, runs, 2.0**-3, 0, SEED)
    assert torch.equal(decayed_only[1000:2000], w[1000:2000]) and not torch.equal(decayed_only[:1000], w[:1000])


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
    fused.update_span(w, z, scaled_grad, ((0, n, False),), 0.0, DROPPED_BITS[torch.float16], SEED)
    assert set(w.float().unique().tolist()) == {1.0, 1.0 + 2.0**-10}
    assert abs(float(w.double().mean()) - (1 + step)) < 5 * 0.5 * 2.0**-10 / n**0.5  # five standard deviations


def test_keys_beyond_the_kernels_range_are_refused() -> None:
    w, z, scaled_grad = _exact_inputs(8, torch.float16, seed=4)
    with pytest.raises(ValueError, match="not a 64-bit unsigned int"):
        fused.update_span(w, z, scaled_grad, ((0, 8, False),), 0.0, 13, 1 << 64)
    far = (1 << 32) - 4  # a span of z whose elements lie at 2^32 - 4 and beyond in the group
    with pytest.raises(ValueError, match=r"keyed by an index below 2\^32"):
        fused.update_span(w, z, scaled_grad, ((far, far + 8, False),), 0.0, 13, SEED, offset=far)


def test_the_kernel_takes_only_16_bit_weights_on_a_gpu() -> None:
    assert not fused.usable(torch.zeros(4, dtype=torch.float16))  # on the CPU: the tensor path
    assert fused.usable(torch.zeros(4, dtype=torch.float16, device=DEVICE)) == (DEVICE.type == "cuda")
    assert not fused.usable(torch.zeros(4, dtype=torch.float32, device=DEVICE))


@pytest.mark.parametrize(("dtype", "rounding"), [(torch.float16, "stochastic"), (torch.bfloat16, "stochastic"),
                                                 (torch.float16, "nearest")])  # fmt: skip
def test_apply_update_runs_the_kernel_once_keyed_by_the_groups_rounding_seed(
    dtype: torch.dtype, rounding: str, monkeypatch
) -> None:
    """A group of decayed and undecayed runs is one ``update_span`` over the group's runs with the
    group's rounding seed; a span of it, one over that span. On a CPU the kernel path is taken by
    hand (``usable`` is for GPUs)."""
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
    seed, decay = chunk_seed(99, 4, 0, ROUNDING_DIRECTION), 2.0**-7
    dropped = DROPPED_BITS[dtype] if rounding == "stochastic" else 0
    got = w.clone()
    apply_update(got, z, update, layout, DirectionSampler(DEVICE))
    expected = w.clone()
    for lo, hi, decayed in layout.update_ranges:  # a launch a run gives the same bits
        fused.update_span(expected, z[lo:hi], update.scaled_grads[0], ((lo, hi, decayed),), decay, dropped, seed,
                          offset=lo)  # fmt: skip
    assert torch.equal(got, expected) and not torch.equal(got, w)
    launches = []
    monkeypatch.setattr(fused, "update_span", lambda *args, **kwargs: launches.append((args[3:], kwargs)))
    apply_update(w.clone(), z, update, layout, DirectionSampler(DEVICE))
    apply_update(w.clone(), z[700:2100], update, layout, DirectionSampler(DEVICE), offset=700)
    assert launches == [((layout.update_ranges, decay, dropped, seed, 0, None), {}),
                        ((layout.update_ranges, decay, dropped, seed, 700, None), {})]  # fmt: skip
    assert layout.update_ranges == ((0, 1000, True), (1000, 1500, False), (1500, 3000, True))


def test_the_kernel_counts_the_elements_it_changes(monkeypatch) -> None:
    """Every element written that differs from what was there, over launches into one counter,
    and through ``ChangeCount`` as the runtime reads it: the exact fraction, no sample."""
    from zoruntime.models.groups import GroupLayout, ParamSlice
    from zoruntime.zo.directions import DirectionSampler
    from zoruntime.zo.update import ChangeCount, PendingUpdate, Rounding, update_group

    w, z, scaled_grad = _exact_inputs(5000, torch.float16, seed=7)
    z[::3] = 0  # a third of the elements do not move
    runs = ((0, 2000, True), (2500, 5000, False))
    counter = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    got = w.clone()
    for lo, hi in ((0, 3000), (3000, 5000)):
        fused.update_span(got, z[lo:hi], scaled_grad, runs, 0.0, 0, SEED, offset=lo, changed=counter)
    assert int(counter) == int((got != w).sum()) > 0

    monkeypatch.setattr(fused, "usable", lambda weights: weights.dtype in DROPPED_BITS)
    layout = GroupLayout(2, (ParamSlice("a", (2000,), 0, True), ParamSlice("b", (3000,), 2000, True)), 5000,
                         torch.float16)  # fmt: skip
    count, before = ChangeCount(), w.clone()
    update = PendingUpdate.from_gradient(0, 9, 1e-3, 0.0, torch.tensor(-0.5, device=DEVICE), Rounding.NEAREST)
    update_group(w, update, layout, DirectionSampler(DEVICE), torch.empty_like(w), changed=count)
    assert count.take() == int((w != before).sum()) / 5000
    assert count.take() is None  # taken: counting starts again
