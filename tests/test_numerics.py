"""Numerics users can trust: weight decay folded into the step, frozen parameters left alone,
the eps that g divides by is the one applied, and 16-bit masters that round stochastically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, token_batch
from safetensors.torch import load_file

import zoruntime
from zoruntime.models.freeze import freeze, parse_freeze
from zoruntime.models.groups import GroupLayout, ParamSlice
from zoruntime.planning.memory import UPDATE_SPAN_ELEMENTS
from zoruntime.policies import FixedDepth
from zoruntime.replay import main as replay_main
from zoruntime.train import main as train_main
from zoruntime.train.loop import UpdateWatch
from zoruntime.zo.directions import DirectionSampler
from zoruntime.zo.estimator import TwoSidedEstimator
from zoruntime.zo.reference import ReferenceZO
from zoruntime.zo.update import (
    DROPPED_BITS,
    ROUNDING_PIECE,
    ChangeCount,
    PendingUpdate,
    Rounding,
    apply_update,
    perturb_into,
)

SAMPLER = DirectionSampler("cpu")


def _layout(numel: int, dtype: torch.dtype, decayed: bool = True) -> GroupLayout:
    return GroupLayout(1, (ParamSlice("w", (numel,), 0, decayed),), numel, dtype)


def _decay_run(lr_wd: float, steps: int, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 weights after ``steps`` updates with random g and z, without and with weight decay."""
    start = torch.randn(numel, generator=torch.Generator().manual_seed(0)) * 0.02
    layout, lr = _layout(numel, torch.float32), 1e-6
    out = []
    for wd in (0.0, lr_wd / lr):
        weights, g = start.clone(), torch.Generator().manual_seed(1)
        for step in range(steps):
            z = torch.randn(numel, generator=g)
            grad = torch.randn((), generator=g)
            apply_update(weights, z, PendingUpdate.from_gradient(step, step, lr, wd, grad), layout, SAMPLER)
        out.append(weights)
    return start, out[1] - out[0]


@pytest.mark.parametrize("lr_wd", [1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9])
def test_realised_weight_decay_is_within_one_percent_of_nominal_in_fp32(lr_wd: float) -> None:
    """1,000 steps on 100,000 fp32 weights: the decay a run with weight decay shows over the same
    run without it is the nominal 1 − (1 − lr·wd)^1000, within 1%, down to lr·wd = 1e-9 (where a
    factor 1 − lr·wd rounds to exactly 1 in float32 and no decay would happen at all)."""
    start, difference = _decay_run(lr_wd, steps=1000, numel=100_000)
    realised = -(difference * start).sum() / (start * start).sum()
    nominal = 1 - (1 - lr_wd) ** 1000
    assert float(realised) == pytest.approx(nominal, rel=0.01)


def test_decay_spares_biases_and_norms_and_frozen_parameters() -> None:
    slices = (ParamSlice("weight", (4,), 0, True), ParamSlice("bias", (4,), 4, False),
              ParamSlice("frozen", (4,), 8, True, trainable=False))  # fmt: skip
    layout = GroupLayout(1, slices, 12, torch.float32)
    weights = torch.ones(12)
    apply_update(weights, torch.zeros(12), PendingUpdate.from_gradient(0, 0, 0.5, 0.5, torch.tensor(0.0)),
                 layout, SAMPLER)  # fmt: skip
    assert weights.tolist() == [0.75] * 4 + [1.0] * 8
    assert layout.update_ranges == ((0, 4, True), (4, 8, False)) and layout.frozen_ranges == ((8, 12),)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_perturbation_applies_exactly_the_eps_that_g_divides_by(dtype: torch.dtype) -> None:
    estimator = TwoSidedEstimator.exact(1e-3, dtype)
    applied = perturb_into(torch.empty(3, dtype=dtype), torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype),
                           estimator.eps)  # fmt: skip
    assert applied.tolist() == [estimator.eps] * 3  # what the 16-bit add applied is what g divides by
    assert estimator.eps == float(torch.tensor(1e-3, dtype=dtype))
    if dtype != torch.float32:
        assert estimator.eps != 1e-3  # 1e-3 itself is not a 16-bit number


@pytest.mark.asyncio
async def test_g_is_the_loss_difference_over_twice_the_applied_eps_in_fp16() -> None:
    model = tiny_model(seed=1, dtype=torch.float16)
    async with zoruntime.Runtime(model, zoruntime.ZOSGD(lr=1e-3, eps=1e-3)) as rt:
        stats = await rt.step(token_batch(model.config))
    eps = float(torch.tensor(1e-3, dtype=torch.float16))
    expected = (torch.tensor(stats.losses[0]) - torch.tensor(stats.losses[1])) / (2.0 * eps)
    assert stats.projected_grads == (float(expected),)


# -- frozen parameters -------------------------------------------------------------------------


def _frozen_model(seed: int = 2) -> torch.nn.Module:
    model = tiny_model(seed=seed, num_hidden_layers=3)
    assert freeze(model, "embeddings,blocks:1") == ["embeddings", "block.1"]
    return model


@pytest.mark.asyncio
async def test_frozen_parameters_are_neither_perturbed_nor_updated_and_keep_their_flags() -> None:
    """Token and position embeddings (the tied head with them) and block 1 frozen: they end
    bitwise as they began, everything else trains, every flag is as the user set it, and the
    runtime equals the reference with the same parts frozen."""
    model, reference_model = _frozen_model(), _frozen_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    config = zoruntime.ZOSGD(lr=1e-2, eps=1e-3, weight_decay=0.1)
    reference = ReferenceZO(reference_model, config)
    async with zoruntime.Runtime(model, config, policy=FixedDepth(1)) as rt:
        for i in range(4):
            batch = token_batch(model.config, seed=i)
            assert await rt.step(batch) == reference.step(batch)
    for name, param in model.named_parameters():
        assert param.requires_grad == flags[name]
        assert torch.equal(param, before[name]) == (not flags[name]), name
    for a, b in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.asyncio
async def test_a_unit_with_nothing_trainable_is_uploaded_but_never_written_back() -> None:
    model = _frozen_model()
    async with zoruntime.Runtime(model, zoruntime.ZOSGD(lr=1e-3), policy=FixedDepth(1), trace=True) as rt:
        for i in range(2):
            await rt.step(token_batch(model.config, seed=i))
    spans = rt.timeline.spans
    for kind in ("upload", "offload"):
        moved = {s.unit for s in spans if s.kind == kind and s.phase == "step"}
        assert ("block.1" in moved) == (kind == "upload"), kind
    assert {s.unit for s in spans if s.phase == "flush"} == {"block.0", "block.2", "embed_head"}


def test_freezing_everything_or_a_part_the_model_lacks_is_refused() -> None:
    model = tiny_model(num_hidden_layers=2)
    with pytest.raises(ValueError, match=r"has no block.2, block.3 \(its blocks are 0-1\)"):
        freeze(model, "blocks:2-3")
    with pytest.raises(ValueError, match="freezes every parameter: nothing is left to train"):
        freeze(model, "embeddings,head,blocks:0-1")
    with pytest.raises(ValueError, match=r"'layers' is not embeddings, head, blocks:A-B or blocks:N"):
        parse_freeze("head,layers")
    with pytest.raises(ValueError, match="runs backwards"):
        parse_freeze("blocks:3-1")
    for param in model.parameters():
        param.requires_grad_(False)
    with pytest.raises(ValueError, match="every parameter of the model has requires_grad=False"):
        zoruntime.Runtime(model, zoruntime.ZOSGD())


FAST = ["--no-progress", "--eval-every", "0", "--no-trace", "--max-length", "32", "--batch-size", "4"]


def test_train_freeze_leaves_those_parts_as_they_were_and_replay_agrees(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert train_main([*FAST, "--steps", "3", "--freeze", "embeddings,blocks:0-1", "--out", str(out)]) == 0
    base, trained = load_file(out / "base" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    tied_head = ["lm_head.weight"]  # the built-in model ties its head to the token embedding: frozen with it
    frozen = [k for k in base if "embed" in k or ".layers.0." in k or ".layers.1." in k or k in tied_head]
    assert frozen and all(torch.equal(base[k], trained[k]) for k in frozen)
    assert all(not torch.equal(base[k], trained[k]) for k in base if k not in frozen)
    assert json.loads((out / "zoruntime.json").read_text())["freeze"] == "embeddings,blocks:0-1"
    assert replay_main(["--run", str(out), "--out", str(tmp_path / "replayed")]) == 0
    replayed = load_file(tmp_path / "replayed" / "model.safetensors")
    assert all(torch.equal(replayed[k], trained[k]) for k in trained)
    capsys.readouterr()
    assert train_main([*FAST, "--steps", "3", "--freeze", "blocks:9", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--freeze 'blocks:9': the model has no block.9" in err
    assert train_main([*FAST, "--steps", "3", "--freeze", "blocks:0-99", "--out", str(tmp_path / "bad")]) == 2
    assert "the model has no block.4, block.5, block.6 and 93 more (its blocks are 0-3)" in capsys.readouterr().err


# -- 16-bit masters --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stochastic_rounding_keeps_updates_far_below_half_a_step_on_average(dtype: torch.dtype) -> None:
    """An update of 1/10 of a 16-bit step: round to nearest changes nothing; stochastic rounding
    changes about 1 weight in 10 by a full step, and on average moves each weight by the update
    (within 3%, over 4 standard deviations, on 200,000 weights)."""
    numel, layout = 200_000, _layout(200_000, dtype, decayed=False)
    weights = (1.0 + torch.rand(numel, generator=torch.Generator().manual_seed(0))).to(dtype)  # in [1, 2)
    step = float(torch.finfo(dtype).eps) / 10  # the spacing in [1, 2) is finfo.eps
    z = torch.ones(numel, dtype=dtype)
    moved = {}
    for rounding in Rounding:
        new = weights.clone()
        update = PendingUpdate.from_gradient(5, 123, step, 0.0, torch.tensor(-1.0), rounding)  # −lr·g = +step
        count = ChangeCount()
        apply_update(new, z, update, layout, SAMPLER, count)
        moved[rounding] = (new.float() - weights.float(), count.take())
    assert moved[Rounding.NEAREST][0].abs().max() == 0 and moved[Rounding.NEAREST][1] == 0.0
    mean = float(moved[Rounding.STOCHASTIC][0].mean())
    assert mean == pytest.approx(step, rel=0.03)
    assert 0.08 < moved[Rounding.STOCHASTIC][1] < 0.12  # the sampled fraction that changed


def test_stochastic_rounding_bits_are_a_pure_function_of_step_seed_and_group() -> None:
    layout = _layout(3 << 20, torch.bfloat16, decayed=False)  # three rounding pieces
    start = torch.randn(3 << 20, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    z = torch.randn(3 << 20, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)

    def updated(seed: int, group_layout: GroupLayout = layout) -> torch.Tensor:
        new = start.clone()
        update = PendingUpdate.from_gradient(0, seed, 1e-4, 0.0, torch.tensor(0.3), Rounding.STOCHASTIC)
        apply_update(new, z, update, group_layout, DirectionSampler("cpu"))
        return new

    assert torch.equal(updated(7), updated(7))  # a fresh sampler, the same bits
    assert not torch.equal(updated(7), updated(8))
    other_group = GroupLayout(2, layout.slices, layout.numel, layout.dtype)
    assert not torch.equal(updated(7), updated(7, other_group))


def _update_by_definition(weights: torch.Tensor, z: torch.Tensor, update: PendingUpdate, layout: GroupLayout,
                          offset: int) -> torch.Tensor:  # fmt: skip
    """``apply_update``'s result over the whole of ``z`` at once, from its docstring: each element's
    own arithmetic, rounding noise from one draw per piece of ``ROUNDING_PIECE`` keyed by
    (step seed, group, piece)."""
    w, end = weights[offset : offset + z.numel()], offset + z.numel()
    decayed = torch.zeros(layout.numel, dtype=torch.bool)
    trainable = torch.zeros(layout.numel, dtype=torch.bool)
    for start, stop, decays in layout.update_ranges:
        trainable[start:stop], decayed[start:stop] = True, decays
    decayed, trainable, g = decayed[offset:end], trainable[offset:end], update.scaled_grads[0]
    exact, z = w.float(), z.float()  # the step and the sum in float32, rounded once (nearest, or stochastically)
    stochastic = update.rounding is Rounding.STOCHASTIC
    plain = exact.clone().addcmul_(z, g)  # undecayed
    stepped = exact + torch.mul(exact, -update.lr * update.weight_decay).addcmul_(z, g)
    new = torch.where(decayed, stepped, plain)
    if stochastic:
        bits = DROPPED_BITS[w.dtype]
        pieces = range(0, layout.numel, ROUNDING_PIECE)
        noise = torch.cat([DirectionSampler("cpu").rounding_noise(update.seed, layout.group, start // ROUNDING_PIECE,
                                                                  min(ROUNDING_PIECE, layout.numel - start), bits)
                           for start in pieces])[offset:end]  # fmt: skip
        new.view(torch.int32).add_(noise).bitwise_and_(-(1 << bits))
    return torch.where(trainable, new.to(w.dtype), w)


UPDATE_CASES = [(torch.bfloat16, Rounding.STOCHASTIC), (torch.float16, Rounding.STOCHASTIC),
                (torch.float16, Rounding.NEAREST), (torch.float32, Rounding.NEAREST)]  # fmt: skip


@pytest.mark.parametrize(("dtype", "rounding"), UPDATE_CASES)
def test_an_update_is_each_elements_own_arithmetic_whatever_the_pieces_and_spans(dtype, rounding) -> None:
    """Runs of decayed, undecayed and frozen parameters crossing rounding pieces, updated whole and
    a part at a time (``offset``): every element equals the update's definition, bitwise."""
    sizes = [(1_500_003, True), (1_001, False), (2_700_017, True), (333, False), (1_000_000, True), (77, False)]
    slices, at = [], 0
    for i, (numel, decays) in enumerate(sizes):
        slices.append(ParamSlice(f"p{i}", (numel,), at, decays, trainable=i != 4))
        at += numel
    layout = GroupLayout(3, tuple(slices), at, dtype)
    assert UPDATE_SPAN_ELEMENTS % ROUNDING_PIECE == 0 and at > UPDATE_SPAN_ELEMENTS  # whole pieces; two spans
    gen = torch.Generator().manual_seed(0)
    start = (torch.randn(at, generator=gen) * 0.05).to(dtype)
    z = torch.randn(at, generator=gen).to(dtype)
    update = PendingUpdate.from_gradient(4, 99, 1e-3, 0.1, torch.tensor(0.37), rounding)
    for offset, count in [(0, at), (3_000_001, 2_000_000), (at - 5_000, 5_000)]:
        new = start.clone()
        apply_update(new, z[offset : offset + count], update, layout, SAMPLER, offset=offset)
        expected = start.clone()
        expected[offset : offset + count] = _update_by_definition(start, z[offset : offset + count], update, layout,
                                                                  offset)  # fmt: skip
        assert torch.equal(new.view(torch.uint8), expected.view(torch.uint8)), (offset, count)
        assert not torch.equal(new[offset : offset + count], start[offset : offset + count])


def test_stochastic_rounding_is_for_16_bit_masters_only() -> None:
    with pytest.raises(ValueError, match="rounding='stochastic' is for 16-bit master weights; these are float32"):
        zoruntime.Runtime(tiny_model(), zoruntime.ZOSGD(rounding="stochastic"))
    with pytest.raises(ValueError, match="rounding must be 'stochastic', 'nearest' or None"):
        zoruntime.ZOSGD(rounding="up")
    assert zoruntime.ZOSGD().rounding_for(torch.bfloat16) is Rounding.STOCHASTIC
    assert zoruntime.ZOSGD().rounding_for(torch.float32) is Rounding.NEAREST


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weights_dtype", ["same", "float32"])
def test_a_16_bit_copy_perturbed_in_pieces_equals_one_perturbed_whole(dtype, weights_dtype) -> None:
    """The kept group is perturbed a span and a chunk of rows at a time, the reference's whole: on
    a CPU PyTorch's 16-bit add with alpha rounds its scalar tail otherwise than its vectorised
    body, so ``perturb_into`` must not depend on where an element lies (61 rows of 27, each row
    its own call, and each element)."""
    gen = torch.Generator().manual_seed(0)
    source = torch.float32 if weights_dtype == "float32" else dtype
    weights = (torch.randn(61 * 27, generator=gen) * 0.05).to(source)
    z = torch.randn(61 * 27, generator=gen).to(source)
    for scale in (1e-3, -1e-3):
        whole = perturb_into(torch.empty(61 * 27, dtype=dtype), weights, z, scale)
        for width in (27, 1):
            pieces = torch.empty_like(whole)
            for at in range(0, whole.numel(), width):
                perturb_into(pieces[at : at + width], weights[at : at + width], z[at : at + width], scale)
            assert torch.equal(pieces.view(torch.int16), whole.view(torch.int16)), (scale, width)
        expected = (z.float() * scale + weights.float()).to(dtype)  # a float32 multiply and add, rounded once
        assert torch.equal(whole.view(torch.int16), expected.view(torch.int16))


@pytest.mark.asyncio
@pytest.mark.parametrize(("dtype", "unit"), [(torch.bfloat16, "block"), (torch.float16, "linear")])
async def test_16_bit_masters_of_odd_widths_equal_the_reference_bitwise(dtype: torch.dtype, unit: str) -> None:
    """Widths no vector length divides (hidden 27, a vocabulary of 61): the kept group's rows and
    spans end mid-vector, where the reference's whole copy does not."""
    shape = dict(hidden_size=27, word_embed_proj_dim=27, ffn_dim=50, num_attention_heads=3, vocab_size=61)
    model, reference_model = (tiny_model(seed=5, dtype=dtype, **shape) for _ in range(2))
    config = zoruntime.ZOSGD(lr=1e-3, eps=1e-3, seed=5)
    reference = ReferenceZO(reference_model, config, unit=unit)
    async with zoruntime.Runtime(model, config, policy=FixedDepth(1, unit=unit)) as rt:
        for i in range(3):
            batch = token_batch(model.config, seed=i)
            assert await rt.step(batch) == reference.step(batch)
    for a, b in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.asyncio
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
async def test_16_bit_masters_equal_the_reference_bitwise_with_either_rounding(rounding: str) -> None:
    model, reference_model = tiny_model(seed=3, dtype=torch.bfloat16), tiny_model(seed=3, dtype=torch.bfloat16)
    config = zoruntime.ZOSGD(lr=1e-3, eps=1e-2, weight_decay=0.05, rounding=rounding)
    reference = ReferenceZO(reference_model, config)
    async with zoruntime.Runtime(model, config, policy=FixedDepth(1, offload_every=2)) as rt:
        for i in range(4):
            batch = token_batch(model.config, seed=i)
            stats = await rt.step(batch)
            assert stats == reference.step(batch)
            assert (stats.changed_fraction is None) == (i == 0)  # step 0 applies no update
    for a, b in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_train_warns_once_when_updates_stop_changing_the_weights() -> None:
    watch = UpdateWatch()
    assert [watch.see(0.5, "nearest") for _ in range(10)] == [None] * 10
    seen = [watch.see(0.01, "nearest") for _ in range(20)]
    warnings = [s for s in seen if s]
    assert len(warnings) == 1 and "--rounding stochastic" in warnings[0] and "of the weights" in warnings[0]
    assert watch.see(None, "nearest") is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("decayed", [False, True])
def test_a_16_bit_update_rounded_to_nearest_takes_the_step_in_float32_and_rounds_once(dtype, decayed) -> None:
    """−lr·g in float32, not rounded to 16 bits before the multiply (bf16 made a step of
    −0.00123456784 one of −0.00123596191, on every weight that takes no decay)."""
    numel, g = 100_000, torch.Generator().manual_seed(3)
    weights = (torch.randn(numel, generator=g) * 0.02).to(dtype)
    z = torch.randn(numel, generator=g).to(dtype)
    update = PendingUpdate.from_gradient(0, 0, 1e-2, 0.0, torch.tensor(0.123456784), Rounding.NEAREST)
    step = update.scaled_grads[0]
    assert step.to(dtype).float() != step  # not representable in 16 bits: the case that was wrong
    expected = torch.addcmul(weights.float(), z.float(), step).to(dtype)
    apply_update(weights, z, update, _layout(numel, dtype, decayed), SAMPLER)
    assert torch.equal(weights, expected)


def test_the_changed_fraction_samples_the_whole_group_evenly() -> None:
    """Between 4,096 and 8,192 elements the stride was 1: only the first 4,096 were sampled."""
    numel = 8_096
    layout = GroupLayout(1, (ParamSlice("a", (4_000,), 0, False), ParamSlice("b", (4_096,), 4_000, False)), numel,
                         torch.float32)  # fmt: skip
    weights = torch.zeros(numel)
    changed = ChangeCount()
    update = PendingUpdate.from_gradient(0, 0, 1.0, 0.0, torch.tensor(1.0))
    z = torch.cat([torch.zeros(4_000), torch.ones(4_096)])  # only b changes: about half the group
    apply_update(weights, z, update, layout, SAMPLER, changed)
    assert changed.take() == pytest.approx(4_096 / numel, abs=0.01)


@pytest.mark.asyncio
async def test_the_lr_schedule_is_asked_for_the_steps_that_run_not_for_evaluations() -> None:
    """An evaluation asked for the next step's lr: a schedule of exactly the run's steps failed."""
    asked: list[int] = []
    rates = [1e-2, 5e-3, 0.0]

    def schedule(step: int) -> float:
        asked.append(step)
        return rates[step]

    model = tiny_model(num_hidden_layers=2)
    batch = token_batch(model.config)
    async with zoruntime.Runtime(model, zoruntime.ZOSGD(lr=1e-2, lr_schedule=schedule)) as rt:
        before = await rt.evaluate(batch)
        for _ in rates:
            await rt.step(batch)
        assert await rt.evaluate(batch) != before
    assert asked == [0, 1, 2]
