"""Addressable random directions: every element of z is a pure function of its key.

Knows how seeds are derived and how a direction is drawn, and nothing about models or
schedules. Under direction scheme 2 (``DIRECTION_SCHEME``) a group's flat buffer of
``group_numel`` elements is cut into chunks of ``CHUNK_ELEMENTS`` (the last one shorter), and
chunk ``c`` of direction ``d`` of group ``g`` in the step whose seed is ``s`` is one
``torch.randn(length_c)`` from a private ``torch.Generator`` seeded with
``chunk_seed(s, g, c, d)``, on the device where the group lives. Any run of elements of a
group's direction can therefore be drawn on its own (``DirectionSampler.draw(..., offset=...)``)
and equals, bitwise, the same elements of a whole-group draw. The global RNG is never touched,
so the order in which groups, chunks or directions are visited, and anything else the program
draws, cannot change z.

Scheme 1 (zoruntime before this module cut groups into chunks) was one ``torch.randn`` over the
whole group, seeded by a hash of (seed, group) alone. A journal or checkpoint records the scheme
it was written with, and one of another scheme is refused (``journal.py``, ``checkpoint.py``):
the same seeds would regenerate different z. Changing how z is drawn (the hashing, the salt,
the chunk length) changes the scheme and must bump ``DIRECTION_SCHEME``.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import torch

DIRECTION_SCHEME = 2
"""Version of the way z is drawn from its key; recorded in journals and checkpoints."""

CHUNK_ELEMENTS = 1 << 24
"""Elements per chunk of a group's direction (the last chunk of a group is shorter); part of
the scheme: another length draws another z."""

ROUNDING_DIRECTION = (1 << 32) - 1
"""The direction index whose chunk seeds key stochastic rounding's noise (``rounding_noise``);
no estimator draws that many directions."""

RESIDENT_GROUP = 0
"""Group id of everything that stays on the compute device (embeddings, final norm, head)."""

_STEP_SALT = 0x5EED
_CHUNK_SALT = 0xC4A2
_WORD = 1 << 32


def block_group(index: int) -> int:
    """Group id of decoder block ``index``."""
    return index + 1


def _mix(*words: int) -> int:
    # SeedSequence hashes its entropy words thoroughly: nearby inputs give unrelated outputs.
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(2, dtype=np.uint32)
    return _seed_of(int(state[0]), int(state[1]))


def _seed_of(first: int, second: int) -> int:
    """A 63-bit seed from two 32-bit words of hashed state."""
    return (first << 31 | second >> 1) & (2**63 - 1)


def step_seed(base_seed: int, step: int) -> int:
    """Seed of step ``step`` of a run started with ``base_seed`` (a 63-bit int)."""
    return _mix(base_seed, step, _STEP_SALT)


_SEEDS: dict[tuple[int, int, int, int], int] = {}
"""Chunk seeds hashed lately (a step's seeds are hashed again one step later, for its update)."""
_SEEDS_KEPT = 1 << 14
_SEEDS_LOCK = threading.Lock()
"""Held to evict and add: several threads hash seeds at once (each runtime's compute lane)."""


def _check_key(seed: int, group: int, chunks: range, direction: int) -> None:
    if not 0 <= seed < _WORD * _WORD:
        raise ValueError(f"step seed {seed} is not a 64-bit unsigned int")
    for name, low, high in (("group", group, group), ("chunk", chunks.start, chunks.stop - 1),
                            ("direction", direction, direction)):  # fmt: skip
        if not (low >= 0 and high < _WORD):
            raise ValueError(f"{name} {low if low < 0 else high} is outside 0 .. 2**32 - 1")


def _remember(key: tuple[int, int, int, int], value: int) -> int:
    with _SEEDS_LOCK:
        if len(_SEEDS) >= _SEEDS_KEPT:
            del _SEEDS[next(iter(_SEEDS))]  # the oldest
        _SEEDS[key] = value
    return value


def chunk_seed(seed: int, group: int, chunk: int, direction: int = 0) -> int:
    """Seed of chunk ``chunk`` of direction ``direction`` of ``group`` in the step whose seed is
    ``seed`` (a 63-bit int). Distinct keys give distinct, unrelated seeds: the step seed is
    split into two fixed 32-bit words, so no two keys hash the same word sequence."""
    key = (seed, group, chunk, direction)
    found = _SEEDS.get(key)
    if found is None:
        _check_key(seed, group, range(chunk, chunk + 1), direction)
        found = _remember(key, _mix(seed % _WORD, seed // _WORD, group, chunk, direction, _CHUNK_SALT))
    return found


def chunk_seeds(seed: int, group: int, chunks: range, direction: int = 0) -> list[int]:
    """``chunk_seed`` of each of ``chunks``, hashed at once (numpy over every chunk: a 1.3B
    block's 48 rounding pieces in a sixth of the time one by one), and remembered for it."""
    _check_key(seed, group, chunks, direction)
    first, second = _seed_sequence_state(
        [seed % _WORD, seed // _WORD, group, np.arange(chunks.start, chunks.stop, dtype=np.uint32), direction,
         _CHUNK_SALT]
    )  # fmt: skip
    return [_remember((seed, group, chunk, direction), _seed_of(int(a), int(b)))
            for chunk, a, b in zip(chunks, first, second, strict=True)]  # fmt: skip


def _seed_sequence_state(words: list[int | np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``np.random.SeedSequence(words).generate_state(2, np.uint32)`` for words of 32 bits, any of
    them an array (numpy's mixing, its pool of four words, broadcast over the arrays; a test checks
    it equals SeedSequence): two arrays of the two state words."""
    u32 = np.uint32
    multiplier = [u32(0x43B0D7E5)]

    def hashmix(value: Any) -> Any:  # uint32 scalars and arrays: numpy's stubs widen their products
        value = value ^ multiplier[0]
        multiplier[0] = multiplier[0] * u32(0x931E8875)
        value = value * multiplier[0]
        return value ^ (value >> u32(16))

    def mix(x: Any, y: Any) -> Any:
        result = u32(0xCA01F9DD) * x - u32(0x4973F715) * y
        return result ^ (result >> u32(16))

    with np.errstate(over="ignore"):
        entropy = [np.asarray(w, dtype=np.uint32) for w in words]
        pool = [hashmix(w) for w in entropy[:4]]
        for source in range(4):
            for target in range(4):
                if source != target:
                    pool[target] = mix(pool[target], hashmix(pool[source]))
        for word in entropy[4:]:
            for target in range(4):
                pool[target] = mix(pool[target], hashmix(word))
        state, multiplier_b = [], u32(0x8B51F9DD)
        for word in pool[:2]:
            value = word ^ multiplier_b
            multiplier_b = multiplier_b * u32(0x58F38DED)
            value = value * multiplier_b
            state.append(np.broadcast_to(value ^ (value >> u32(16)), np.shape(entropy[3])))
    return state[0], state[1]


class DrawnChunk:
    """A buffer that keeps the last whole chunk a sampler drew for a draw of part of a chunk, with
    that chunk's key. A chunk is one ``randn`` over its whole length, so a part costs as much as
    the whole; the next part of the same chunk is then copied from here instead of drawn again
    (a vocabulary's rows and the small parameters beside them are many parts of few chunks).
    Written only by ``DirectionSampler.draw``; holds at most ``CHUNK_ELEMENTS`` elements."""

    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer
        self.key: tuple[int, int, int, int, int] | None = None  # (seed, group, chunk, direction, length)


class DirectionSampler:
    """Draws z into caller-owned buffers; one sampler per device, used by one thread at a time.

    ``chunk_elements`` is for tests only (small chunks exercise the chunk boundaries on small
    buffers): the scheme version fixes it at ``CHUNK_ELEMENTS``, and any other value draws
    directions that no journal or checkpoint of this scheme was written with.
    """

    def __init__(self, device: torch.device | str, *, chunk_elements: int = CHUNK_ELEMENTS) -> None:
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements must be positive, not {chunk_elements}")
        self.device = torch.empty(0, device=device).device  # "cuda" names the current GPU: cuda:0, say
        self.chunk_elements = chunk_elements
        self._generator = torch.Generator(device=self.device)

    def draw(
        self,
        seed: int,
        group: int,
        out: torch.Tensor,
        *,
        direction: int = 0,
        offset: int = 0,
        group_numel: int | None = None,
        drawn: DrawnChunk | None = None,
    ) -> torch.Tensor:
        """Fill ``out`` (flat, contiguous, on this sampler's device) with elements
        ``[offset, offset + out.numel())`` of direction ``direction`` of ``group`` in the step
        whose seed is ``seed``; returns ``out``.

        ``group_numel`` is the group's full length, which fixes where its chunks are cut. With
        ``offset == 0`` it defaults to ``out.numel()`` (``out`` is the whole group); a draw of
        part of a group at ``offset > 0`` must give it. ``drawn`` (of ``out``'s dtype): where a
        chunk ``out`` takes only part of is kept, so a later part of it is not drawn again.
        """
        if out.device != self.device or out.dim() != 1 or not out.is_contiguous():
            raise ValueError(f"direction buffer must be flat and contiguous on {self.device}")
        if offset < 0:
            raise ValueError(f"offset {offset} is negative; it is the index in the group of out's first element")
        if group_numel is None:
            if offset:
                raise ValueError(
                    f"drawing part of a group at offset {offset} needs group_numel=, the group's full length "
                    "(it fixes where the group's chunks are cut)"
                )
            group_numel = out.numel()
        end = offset + out.numel()
        if end > group_numel:
            raise ValueError(
                f"out holds elements {offset} .. {end - 1} but the group has only {group_numel}; "
                "shorten out or fix offset / group_numel"
            )
        if out.numel() == 0:
            return out
        size = self.chunk_elements
        for chunk in range(offset // size, (end - 1) // size + 1):
            start = chunk * size
            length = min(size, group_numel - start)
            lo, hi = max(offset, start), min(end, start + length)
            target = out[lo - offset : hi - offset]
            if lo == start and hi == start + length:  # the whole chunk: straight into out
                self._generator.manual_seed(chunk_seed(seed, group, chunk, direction))
                torch.randn(length, generator=self._generator, out=target)
            else:  # part of it: the same draw at full length, then the part that is wanted
                whole = self._whole_chunk((seed, group, chunk, direction, length), out.dtype, drawn)
                target.copy_(whole[lo - start : hi - start])
        return out

    def _whole_chunk(
        self, key: tuple[int, int, int, int, int], dtype: torch.dtype, drawn: DrawnChunk | None
    ) -> torch.Tensor:
        """The chunk of ``key`` drawn whole: kept in ``drawn`` where it fits (and drawn only if
        ``drawn`` does not hold it already), else in a buffer of its own."""
        seed, group, chunk, direction, length = key
        if drawn is None or drawn.buffer.dtype != dtype or drawn.buffer.numel() < length:
            self._generator.manual_seed(chunk_seed(seed, group, chunk, direction))
            return torch.randn(length, generator=self._generator, dtype=dtype, device=self.device)
        whole = drawn.buffer[:length]
        if drawn.key != key:
            drawn.key = None  # a draw that fails keeps no key
            self._generator.manual_seed(chunk_seed(seed, group, chunk, direction))
            torch.randn(length, generator=self._generator, out=whole)
            drawn.key = key
        return whole

    def rounding_noise(
        self, seed: int, group: int, piece: int, length: int, bits: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``length`` int32 values uniform in [0, 2^bits) for piece ``piece`` of ``group``'s update
        in the step whose seed is ``seed``: stochastic rounding's noise, a pure function of that key
        (drawn into ``out``, flat int32 of that length on this device, where given)."""
        self._generator.manual_seed(chunk_seed(seed, group, piece, ROUNDING_DIRECTION))
        return torch.randint(0, 1 << bits, (length,), generator=self._generator, dtype=torch.int32, device=self.device,
                             out=out)  # fmt: skip
