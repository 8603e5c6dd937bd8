"""Shared fixtures: tiny configurations covering OPT's architectural variants and a Llama-family
model (grouped-query attention, rotary positions, RMSNorm), batches, and a CPU backend that
takes CUDA's path through the scheduler (a pass enqueued in one trip)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels (zoruntime.zo.fused) run in its interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when Triton is imported, below
from transformers import OPTConfig

from zoruntime import engine
from zoruntime.device.cpu import CPUBackend
from zoruntime.models import random_opt, tiny_opt_config
from zoruntime.models.init import materialize_flat, tiny_llama_config
from zoruntime.runtime import Task, Work

T = TypeVar("T")

VARIANTS = {
    # like opt-125m: layer norm before attention, final layer norm, tied head
    "pre_ln_tied": dict(vocab_size=64, hidden_size=32, ffn_dim=64, max_position_embeddings=48, word_embed_proj_dim=32),
    # like opt-350m: layer norm after attention, project_in/out, no final layer norm
    "post_ln_proj": dict(
        vocab_size=64,
        hidden_size=32,
        ffn_dim=64,
        max_position_embeddings=48,
        do_layer_norm_before=False,
        word_embed_proj_dim=16,
    ),
    "pre_ln_untied": dict(
        vocab_size=64,
        hidden_size=32,
        ffn_dim=64,
        max_position_embeddings=48,
        word_embed_proj_dim=32,
        tie_word_embeddings=False,
    ),
}


LLAMA_VARIANTS = {
    # the Llama family: 4 query heads sharing 2 key/value heads, untied head
    "llama_gqa": dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=48),
}  # fmt: skip
FAMILIES = ["pre_ln_tied", "llama_gqa"]
"""One variant per model family, for invariant tests parametrized over families."""


def variant_config(name: str, **overrides: object) -> OPTConfig:
    return tiny_opt_config(**{**VARIANTS[name], **overrides})


@pytest.fixture(params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    return request.param


def token_batch(config: OPTConfig, rows: int = 3, length: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids with right padding in row 0 and left padding in row 1; labels -100 where padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, config.vocab_size, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, length - 4 :] = 0
    if rows > 1:
        mask[1, :3] = 0
    ids[mask == 0] = config.pad_token_id
    labels = ids.clone()
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tiny_model(name: str = "pre_ln_tied", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: object):
    """A random model of variant ``name``, drawn from ``seed`` alone."""
    if name in LLAMA_VARIANTS:
        config = tiny_llama_config(**{**LLAMA_VARIANTS[name], **overrides})
        return materialize_flat(config, lambda n, d: torch.empty(n, dtype=d), seed=seed, dtype=dtype)
    return random_opt(variant_config(name, **overrides), seed=seed, dtype=dtype)


class SerialEnqueuer:
    """The CPU's stand-in for CUDA's stream enqueuer (``runtime.scheduler.Enqueuer``): a task's
    work runs when it is enqueued, on one worker thread, and its handle is the task. It refuses
    a handle it has not returned, so a task ordered after one not yet enqueued fails loudly."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-enqueue")
        self.trips = 0
        self.threads: set[int] = set()
        self._issued: set[int] = set()
        self._handles: list[object] = []

    def enqueue(self, step: int, task: Task, work: Work, after: Sequence[object]) -> object:
        assert all(id(handle) in self._issued for handle in after), f"{task} ordered after a task not enqueued"
        self.threads.add(threading.get_ident())
        work()
        handle = object()
        self._issued.add(id(handle))
        self._handles.append(handle)  # kept alive, so ids stay unique
        return handle

    async def call(self, fn: Callable[[], T]) -> T:
        self.trips += 1
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def close(self) -> None:
        self._executor.shutdown(wait=True)


class OneTripCPUBackend(CPUBackend):
    """The CPU backend with its lanes replaced by a ``SerialEnqueuer``: the runtime then takes the
    path CUDA takes (a pass in one trip, tasks complete when enqueued), minus the GPU."""

    completes_on_enqueue = True

    def __init__(self) -> None:
        super().__init__()
        self.lanes = SerialEnqueuer()  # type: ignore[assignment]

    def close(self) -> None:
        super().close()
        self.lanes.close()


@pytest.fixture
def one_trip(monkeypatch: pytest.MonkeyPatch) -> list[OneTripCPUBackend]:
    """Runtimes opened in the test run on ``OneTripCPUBackend``; the list holds the backends made."""
    made: list[OneTripCPUBackend] = []

    def backend_for(device: object, timing: bool) -> OneTripCPUBackend:
        made.append(OneTripCPUBackend())
        return made[-1]

    monkeypatch.setattr(engine, "backend_for", backend_for)
    return made
