"""The in-memory reference ZO-SGD step: no drift, tied weights, weight decay, the update formula, learning."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, token_batch

from zoruntime.models import OPTAdapter
from zoruntime.zo import ZOSGD, DirectionSampler, StepStats, block_group, step_seed
from zoruntime.zo.reference import ReferenceZO


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lr_zero_leaves_weights_bitwise_unchanged_after_20_steps(dtype: torch.dtype) -> None:
    model = tiny_model("pre_ln_tied", dtype=dtype)
    before = _snapshot(model)
    ref = ReferenceZO(model, ZOSGD(lr=0.0, eps=1e-2, weight_decay=0.1))
    for step in range(20):
        stats = ref.step(token_batch(model.config, seed=step))
        assert stats.losses[0] != stats.losses[1]  # the forwards really were perturbed
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_one_step_follows_the_zo_sgd_formula(variant: str) -> None:
    model = tiny_model(variant, seed=1)
    before = _snapshot(model)
    cfg = ZOSGD(lr=1e-2, eps=1e-3, weight_decay=0.5, seed=11)
    stats = ReferenceZO(model, cfg).step(token_batch(model.config))
    assert isinstance(stats, StepStats) and stats.step == 0 and stats.seed == step_seed(11, 0)
    assert stats.projected_grads[0] == pytest.approx((stats.losses[0] - stats.losses[1]) / (2 * cfg.eps), rel=1e-5)
    adapter = OPTAdapter(model)
    sampler = DirectionSampler("cpu")
    full = {id(p): n for n, p in model.named_parameters()}
    for layout, params in adapter.groups():
        z = layout.views(sampler.draw(stats.seed, layout.group, torch.empty(layout.numel)))
        for piece in layout.slices:
            name = full[id(params[piece.name])]
            wd = cfg.weight_decay if piece.decayed else 0.0
            expected = before[name] - cfg.lr * (stats.projected_grads[0] * z[piece.name] + wd * before[name])
            torch.testing.assert_close(params[piece.name], expected, rtol=0, atol=1e-6)


def test_tied_weight_gets_one_direction_and_one_update() -> None:
    model = tiny_model("pre_ln_tied", seed=2)
    before = model.lm_head.weight.detach().clone()
    cfg = ZOSGD(lr=1e-2, eps=1e-3)
    stats = ReferenceZO(model, cfg).step(token_batch(model.config))
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    adapter = OPTAdapter(model)
    z = adapter.embed_head_layout.views(
        DirectionSampler("cpu").draw(stats.seed, 0, torch.empty(adapter.embed_head_layout.numel))
    )["embed_tokens.weight"]
    # applied twice (once as embedding, once as head) the change would be twice as large
    change = -cfg.lr * stats.projected_grads[0] * z
    torch.testing.assert_close(model.lm_head.weight - before, change, rtol=1e-4, atol=1e-7)


def test_weight_decay_skips_biases_and_layer_norms() -> None:
    batch = token_batch(tiny_model().config)
    plain, decayed = tiny_model(seed=4), tiny_model(seed=4)
    ReferenceZO(plain, ZOSGD(lr=1e-2, eps=1e-3)).step(batch)
    ReferenceZO(decayed, ZOSGD(lr=1e-2, eps=1e-3, weight_decay=0.5)).step(batch)
    for (name, p), q in zip(plain.named_parameters(), decayed.parameters(), strict=True):
        if name.endswith("bias") or "layer_norm" in name:
            assert torch.equal(p, q), name
        else:
            assert not torch.equal(p, q), name


def test_direction_of_a_block_matches_its_group_id() -> None:
    model = tiny_model(seed=6)
    block_before = {n: p.clone() for n, p in model.model.decoder.layers[1].named_parameters()}
    cfg = ZOSGD(lr=1e-2, eps=1e-3)
    stats = ReferenceZO(model, cfg).step(token_batch(model.config))
    layout = OPTAdapter(model).block_layouts[1]
    z = layout.views(DirectionSampler("cpu").draw(stats.seed, block_group(1), torch.empty(layout.numel)))
    for n, p in model.model.decoder.layers[1].named_parameters():
        torch.testing.assert_close(p - block_before[n], -cfg.lr * stats.projected_grads[0] * z[n], rtol=1e-4, atol=1e-7)


def test_custom_loss_function_replaces_the_causal_lm_loss() -> None:
    model = tiny_model(seed=7)
    calls = []

    def last_token_loss(logits: torch.Tensor, batch) -> torch.Tensor:
        calls.append(logits.shape)
        return torch.nn.functional.cross_entropy(logits[:, -1].float(), batch.input_ids[:, 0])

    stats = ReferenceZO(model, ZOSGD(lr=1e-3, eps=1e-3), loss_fn=last_token_loss).step(token_batch(model.config))
    assert len(calls) == 2 and calls[0][-1] == model.config.vocab_size
    assert stats.losses[0] != stats.losses[1]


def _pattern_batch(index: int, rows: int = 8, length: int = 32) -> dict[str, torch.Tensor]:
    """A task made here: a fixed 8-token cycle read from a random phase."""
    pattern = torch.tensor([3, 9, 14, 22, 27, 35, 41, 50])
    start = torch.randint(0, 8, (rows,), generator=torch.Generator().manual_seed(index))
    return {"input_ids": pattern[(start[:, None] + torch.arange(length)[None]) % 8]}


@pytest.mark.slow
def test_reference_step_learns_a_small_task() -> None:
    model = tiny_model("pre_ln_tied", seed=0)
    ref = ReferenceZO(model, ZOSGD(lr=5e-3, eps=1e-3, seed=1))
    held_out = _pattern_batch(10**6)
    start = ref.evaluate(held_out)
    for step in range(1000):
        ref.step(_pattern_batch(step))
    end = ref.evaluate(held_out)
    assert end < 0.7 * start, (start, end)


def test_the_mezo_baseline_is_mezos_algorithm() -> None:
    """L+ is the model's loss at θ + εz with z drawn tensor by tensor from the step's seed, and the
    update is θ − lr·(g·z + wd·θ), with no decay on biases and layer norms."""
    from zoruntime.zo.directions import step_seed
    from zoruntime.zo.mezo import MeZOBaseline

    model, twin = tiny_model(seed=3), tiny_model(seed=3)
    batch = token_batch(model.config)
    before = {n: p.detach().clone() for n, p in twin.named_parameters()}
    baseline = MeZOBaseline(model, lr=1e-2, eps=1e-3, weight_decay=0.1, seed=5)
    loss_plus, loss_minus, grad = baseline.step(batch)
    generator = torch.Generator().manual_seed(step_seed(5, 0))
    zs = {n: torch.normal(0.0, 1.0, size=p.shape, generator=generator) for n, p in twin.named_parameters()}
    with torch.no_grad():
        for n, p in twin.named_parameters():
            p.add_(zs[n], alpha=1e-3)
        assert float(twin(**batch).loss) == loss_plus
    assert grad == (loss_plus - loss_minus) / 2e-3
    for n, p in model.named_parameters():
        decay = 0.0 if ("bias" in n or "layer_norm" in n) else 0.1
        expected = before[n] - 1e-2 * (grad * zs[n] + decay * before[n])
        assert torch.allclose(p, expected, atol=1e-6), n  # in-place ±ε leaves an ulp or so of drift
