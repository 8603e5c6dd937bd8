"""Invariant 3: every element of z is a pure function of (step seed, group, chunk, direction)."""

from __future__ import annotations

import itertools
import sys
import threading

import pytest
import torch

from zoruntime.zo import CHUNK_ELEMENTS, DIRECTION_SCHEME, DirectionSampler, chunk_seed, directions, step_seed
from zoruntime.zo.directions import DrawnChunk

GROUP = 2_500  # elements of the group the chunked tests draw
CHUNK = 1_000  # small chunks, so the group has three (the last one 500 long)


def _draw(sampler: DirectionSampler, seed: int, group: int, n: int = 1000, **where: int) -> torch.Tensor:
    return sampler.draw(seed, group, torch.empty(n), **where)


def test_the_scheme_is_pinned() -> None:
    assert DIRECTION_SCHEME == 2 and CHUNK_ELEMENTS == 1 << 24
    assert DirectionSampler("cpu").chunk_elements == CHUNK_ELEMENTS
    # the seeds themselves (numpy's SeedSequence hashing), so no change of hashing goes unseen
    assert step_seed(7, 3) == 2571159122081593984
    assert chunk_seed(1, 2, 3, 4) == 7213693066999673082
    assert chunk_seed(2**63 - 1, 2**32 - 1, 0, 2**32 - 1) == 8741729783920557723


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
    _draw(DirectionSampler("cpu", chunk_elements=CHUNK), seed, 3, n=700, offset=1_300, group_numel=GROUP)
    assert torch.equal(torch.random.get_rng_state(), moved)
    assert not torch.equal(state, moved)


def test_chunked_draws_ignore_order_and_the_global_rng() -> None:
    seed, sampler = step_seed(5, 9), DirectionSampler("cpu", chunk_elements=CHUNK)
    keys = [(g, d) for g in range(3) for d in range(2)]
    whole = {k: _draw(sampler, seed, k[0], n=GROUP, direction=k[1]) for k in keys}
    for i, (g, d) in enumerate(reversed(keys)):
        torch.manual_seed(i)  # reseeding the global generator between draws changes nothing
        torch.randn(17)
        part = _draw(sampler, seed, g, n=900, direction=d, offset=1_100, group_numel=GROUP)
        assert torch.equal(part, whole[(g, d)][1_100:2_000])
        assert torch.equal(
            _draw(DirectionSampler("cpu", chunk_elements=CHUNK), seed, g, n=GROUP, direction=d), whole[(g, d)]
        )


@pytest.mark.parametrize(
    "cuts",
    [
        [0, 1_000, 2_500],  # on the chunk boundary
        [0, 1_234, 2_500],  # across one
        [0, 999, 1_001, 2_500],  # a part within two chunks' edges
        [0, 17, 2_001, 2_500],  # a part spanning a whole chunk and pieces of two
        [0, 1_100, 1_900, 2_500],  # a part inside one chunk
        [0, 2_499, 2_500],  # the last element alone
    ],
)
def test_a_group_drawn_in_parts_equals_it_drawn_whole_bitwise(cuts: list[int]) -> None:
    seed = step_seed(3, 11)
    for dtype in (torch.float32, torch.bfloat16):
        sampler = DirectionSampler("cpu", chunk_elements=CHUNK)
        whole = sampler.draw(seed, 4, torch.empty(GROUP, dtype=dtype))
        pieced = torch.empty(GROUP, dtype=dtype)
        for lo, hi in itertools.pairwise(cuts):
            sampler.draw(seed, 4, pieced[lo:hi], offset=lo, group_numel=GROUP)
        assert torch.equal(pieced, whole)
    prefix = _draw(sampler, seed, 4, n=1_500, group_numel=GROUP)  # offset 0 with the group's length given
    assert torch.equal(prefix, _draw(sampler, seed, 4, n=GROUP)[:1_500])


def test_parts_through_a_drawn_chunk_equal_the_whole_draw_and_draw_each_chunk_once(monkeypatch) -> None:
    """Parts of a group in small pieces (as a vocabulary's rows and the parameters beside them
    are drawn) through a ``DrawnChunk``: bitwise the whole-group draw, each chunk drawn once
    while its parts come in a row; interleaved keys (another direction, seed or group) redraw."""
    seed, sampler = step_seed(5, 8), DirectionSampler("cpu", chunk_elements=CHUNK)
    drawn = DrawnChunk(torch.empty(CHUNK))
    seeded: list[int] = []  # a chunk's seed is derived each time it is drawn
    monkeypatch.setattr(directions, "chunk_seed", lambda *key: seeded.append(key[2]) or chunk_seed(*key))
    whole = {d: sampler.draw(seed, 4, torch.empty(GROUP), direction=d) for d in (0, 1)}
    seeded.clear()
    pieced = torch.empty(GROUP)
    for lo in range(0, GROUP, 300):  # 300-element parts: 4 to a chunk, one across each boundary
        hi = min(GROUP, lo + 300)
        sampler.draw(seed, 4, pieced[lo:hi], offset=lo, group_numel=GROUP, drawn=drawn)
    assert torch.equal(pieced, whole[0]) and len(seeded) == 3  # chunks 0, 1, 2 once each
    seeded.clear()
    for d in (1, 0, 1):  # alternating directions: each part of another key draws its chunk again
        part = torch.empty(100)
        sampler.draw(seed, 4, part, offset=1_100, group_numel=GROUP, drawn=drawn, direction=d)
        assert torch.equal(part, whole[d][1_100:1_200])
    assert len(seeded) == 3
    other = torch.empty(100)
    sampler.draw(seed + 1, 4, other, offset=1_100, group_numel=GROUP, drawn=drawn, direction=1)
    assert not torch.equal(other, whole[1][1_100:1_200])
    for buffer in (torch.empty(CHUNK, dtype=torch.bfloat16), torch.empty(CHUNK // 2)):  # not usable: drawn apart
        part = torch.empty(100)
        sampler.draw(seed, 4, part, offset=1_100, group_numel=GROUP, drawn=DrawnChunk(buffer))
        assert torch.equal(part, whole[0][1_100:1_200])


def test_a_failed_draw_into_a_drawn_chunk_keeps_no_key(monkeypatch) -> None:
    seed, sampler = step_seed(5, 8), DirectionSampler("cpu", chunk_elements=CHUNK)
    drawn, real_randn = DrawnChunk(torch.empty(CHUNK)), torch.randn

    def failing(*args, **kwargs):
        kwargs["out"].fill_(0.0)  # half-written, then the device gives up
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(torch, "randn", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        sampler.draw(seed, 4, torch.empty(100), offset=100, group_numel=GROUP, drawn=drawn)
    assert drawn.key is None
    monkeypatch.setattr(torch, "randn", real_randn)
    part = sampler.draw(seed, 4, torch.empty(100), offset=100, group_numel=GROUP, drawn=drawn)
    assert torch.equal(part, sampler.draw(seed, 4, torch.empty(GROUP))[100:200])


def test_chunks_are_drawn_with_their_own_seeds() -> None:
    seed, sampler = step_seed(1, 2), DirectionSampler("cpu", chunk_elements=CHUNK)
    z = _draw(sampler, seed, 1, n=GROUP)
    for chunk, (lo, hi) in enumerate([(0, 1_000), (1_000, 2_000), (2_000, 2_500)]):
        generator = torch.Generator().manual_seed(chunk_seed(seed, 1, chunk, 0))
        assert torch.equal(z[lo:hi], torch.randn(hi - lo, generator=generator))
    default = _draw(DirectionSampler("cpu"), seed, 1, n=GROUP)  # one chunk: the whole group
    assert torch.equal(default, torch.randn(GROUP, generator=torch.Generator().manual_seed(chunk_seed(seed, 1, 0))))


def test_groups_steps_and_directions_get_different_directions() -> None:
    sampler = DirectionSampler("cpu")
    seed = step_seed(0, 0)
    assert not torch.equal(_draw(sampler, seed, 1), _draw(sampler, seed, 2))
    assert not torch.equal(_draw(sampler, seed, 1), _draw(sampler, step_seed(0, 1), 1))
    assert not torch.equal(_draw(sampler, seed, 1), _draw(sampler, seed, 1, direction=1))
    assert not torch.equal(_draw(sampler, seed, 1, direction=1), _draw(sampler, seed, 1, direction=2))
    chunked = DirectionSampler("cpu", chunk_elements=CHUNK)
    z = _draw(chunked, seed, 1, n=GROUP)
    assert not torch.equal(z[:1_000], z[1_000:2_000])  # chunks of one direction differ too
    assert len({step_seed(0, s) for s in range(1000)}) == 1000


def test_chunk_seeds_are_unique_over_many_keys() -> None:
    seeds = [step_seed(0, 0), step_seed(0, 1), 1, 2**32 + 1]  # small seeds too: no word-boundary aliasing
    keys = [(s, g, c, d) for s in seeds for g in range(20) for c in range(15) for d in range(8)]
    assert len({chunk_seed(*key) for key in keys}) == len(keys)
    assert chunk_seed(1, 0, 0) == chunk_seed(1, 0, 0, 0) != chunk_seed(1, 0, 0, 1)
    with pytest.raises(ValueError, match=r"direction -1 is outside"):
        chunk_seed(1, 0, 0, -1)


def test_chunk_seeds_hashed_at_once_equal_them_hashed_one_by_one() -> None:
    keys = [(1, 0, range(0, 5), 0), (step_seed(3, 9), 7, range(40, 88), 2**32 - 1), (2**64 - 1, 2**32 - 1,
            range(2**32 - 3, 2**32), 5), (2**32, 1, range(0), 0)]  # fmt: skip
    for seed, group, chunks, direction in keys:
        at_once = directions.chunk_seeds(seed, group, chunks, direction)
        directions._SEEDS.clear()  # hashed again, one by one, by SeedSequence itself
        assert at_once == [chunk_seed(seed, group, c, direction) for c in chunks]
    with pytest.raises(ValueError, match=r"chunk 4294967296 is outside 0 \.\. 2\*\*32 - 1"):
        directions.chunk_seeds(1, 0, range(2**32 - 1, 2**32 + 1))
    with pytest.raises(ValueError, match=r"step seed -1 is not a 64-bit unsigned int"):
        directions.chunk_seeds(-1, 0, range(3))


def test_seeds_are_hashed_from_several_threads_at_once_once_the_cache_is_full() -> None:
    """Two runtimes' compute lanes (or a runtime and a reference in a thread) hash seeds at the
    same time; once the cache of recent seeds is full each new key evicts the oldest, and two
    threads evicting the same one failed a step with a KeyError."""
    errors: list[BaseException] = []

    def hash_many(base: int) -> None:
        try:
            for i in range(20_000):
                chunk_seed(base + i, 1, 0)
                if i % 8 == 0:
                    directions.chunk_seeds(base + i, 2, range(3), 1)
        except Exception as error:  # any failure of a thread is the test's failure
            errors.append(error)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often, so the eviction's steps interleave
    try:
        threads = [threading.Thread(target=hash_many, args=(k << 40,)) for k in range(1, 4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert errors == []
    assert len(directions._SEEDS) == directions._SEEDS_KEPT


def test_bad_requests_are_refused_with_the_fix() -> None:
    seed, sampler = step_seed(0, 0), DirectionSampler("cpu", chunk_elements=CHUNK)
    with pytest.raises(ValueError, match=r"offset 10 needs group_numel=, the group's full length"):
        _draw(sampler, seed, 1, n=10, offset=10)
    with pytest.raises(ValueError, match=r"offset -1 is negative"):
        _draw(sampler, seed, 1, n=10, offset=-1, group_numel=GROUP)
    with pytest.raises(ValueError, match=r"out holds elements 2490 \.\. 2509 but the group has only 2500"):
        _draw(sampler, seed, 1, n=20, offset=2_490, group_numel=GROUP)
    with pytest.raises(ValueError, match=r"out holds elements 0 \.\. 2500 but the group has only 2500"):
        _draw(sampler, seed, 1, n=2_501, group_numel=GROUP)
    with pytest.raises(ValueError, match=r"flat and contiguous"):
        sampler.draw(seed, 1, torch.empty(10, 10))
    with pytest.raises(ValueError, match=r"chunk_elements must be positive"):
        DirectionSampler("cpu", chunk_elements=0)
    assert _draw(sampler, seed, 1, n=0, offset=GROUP, group_numel=GROUP).numel() == 0


def test_direction_is_standard_normal_in_every_dtype() -> None:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        z = DirectionSampler("cpu").draw(step_seed(0, 0), 0, torch.empty(200_000, dtype=dtype)).float()
        assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01
    z = DirectionSampler("cpu", chunk_elements=CHUNK).draw(step_seed(0, 0), 0, torch.empty(200_000)).float()
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01  # chunks do not correlate
