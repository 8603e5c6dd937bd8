"""Invariant 3: z for (step seed, group) is a pure function of the two."""

from __future__ import annotations

import torch

from zoruntime.zo import DirectionSampler, group_seed, step_seed


def _draw(sampler: DirectionSampler, seed: int, group: int, n: int = 1000) -> torch.Tensor:
    return sampler.draw(seed, group, torch.empty(n))


def test_direction_is_regenerated_bitwise_in_any_visiting_order() -> None:
    seed = step_seed(7, 3)
    forward = {g: _draw(DirectionSampler("cpu"), seed, g) for g in range(6)}
    sampler = DirectionSampler("cpu")
    for g in [5, 2, 0, 4, 1, 3, 2, 5]:
        assert torch.equal(_draw(sampler, seed, g), forward[g])


def test_direction_does_not_depend_on_or_touch_the_global_rng() -> None:
    seed = step_seed(0, 1)
    first = _draw(DirectionSampler("cpu"), seed, 2)
    state = torch.random.get_rng_state()
    torch.rand(123)  # move the global generator on
    assert torch.equal(_draw(DirectionSampler("cpu"), seed, 2), first)
    moved = torch.random.get_rng_state()
    _draw(DirectionSampler("cpu"), seed, 3)
    assert torch.equal(torch.random.get_rng_state(), moved)
    assert not torch.equal(state, moved)


def test_groups_and_steps_get_different_directions() -> None:
    sampler = DirectionSampler("cpu")
    seed = step_seed(0, 0)
    assert not torch.equal(_draw(sampler, seed, 1), _draw(sampler, seed, 2))
    assert not torch.equal(_draw(sampler, seed, 1), _draw(sampler, step_seed(0, 1), 1))
    assert len({step_seed(0, s) for s in range(1000)}) == 1000
    assert len({group_seed(seed, g) for g in range(1000)}) == 1000


def test_direction_is_standard_normal_in_every_dtype() -> None:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        z = DirectionSampler("cpu").draw(step_seed(0, 0), 0, torch.empty(200_000, dtype=dtype)).float()
        assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
