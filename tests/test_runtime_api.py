"""The public API in a user's own async code: errors that name the task, no thread left behind,
one step at a time, uvloop."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from conftest import tiny_model, token_batch

import zoruntime
from zoruntime.policies import FixedDepth


def _zoruntime_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("zoruntime-")]


@pytest.mark.asyncio
async def test_an_error_in_a_block_names_the_task_and_leaves_no_thread_behind(monkeypatch) -> None:
    model = tiny_model(num_hidden_layers=4)
    rt = zoruntime.Runtime(model, zoruntime.ZOSGD(lr=1e-3), policy=FixedDepth(1))
    original = rt.adapter.bound_layer

    def failing_layer(index, params):
        layer = original(index, params)

        def maybe_fail(hidden, kwargs):
            if index == 2:
                raise RuntimeError("simulated kernel failure")
            return layer(hidden, kwargs)

        return maybe_fail

    monkeypatch.setattr(rt.adapter, "bound_layer", failing_layer)
    with pytest.raises(zoruntime.TaskFailed, match=r"step 0: compute of block.2 failed: RuntimeError: simulated"):
        async with rt:
            await rt.step(token_batch(model.config))
    assert _zoruntime_threads() == []
    assert {t for t in asyncio.all_tasks() if t is not asyncio.current_task()} == set()


@pytest.mark.asyncio
async def test_steps_must_be_awaited_one_at_a_time() -> None:
    model = tiny_model(num_hidden_layers=2)
    async with zoruntime.Runtime(model, zoruntime.ZOSGD(lr=1e-3)) as rt:
        first = asyncio.create_task(rt.step(token_batch(model.config)))
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match=r"while another step runs; await each call"):
            await rt.step(token_batch(model.config))
        assert (await first).step == 0
        assert (await rt.step(token_batch(model.config))).step == 1


@pytest.mark.asyncio
async def test_using_a_runtime_that_is_not_open_says_how_to_open_it() -> None:
    rt = zoruntime.Runtime(tiny_model(), zoruntime.ZOSGD())
    with pytest.raises(RuntimeError, match=r"open the runtime before rt.step\(\).*async with"):
        await rt.step(token_batch(rt.model.config))


def test_bad_constructor_arguments() -> None:
    with pytest.raises(TypeError, match=r"optimizer must be zoruntime.ZOSGD"):
        zoruntime.Runtime(tiny_model(), {"lr": 1e-3})  # type: ignore[arg-type]
    rt = zoruntime.Runtime(tiny_model(), zoruntime.ZOSGD(), device="mps")
    with pytest.raises(ValueError, match=r"device 'mps' is not supported"):
        zoruntime.run(rt.open())


@pytest.mark.asyncio
async def test_a_bad_batch_is_refused_before_anything_runs() -> None:
    model = tiny_model(num_hidden_layers=2)
    async with zoruntime.Runtime(model, zoruntime.ZOSGD(lr=1e-3)) as rt:
        with pytest.raises(ValueError, match=r"must lie in \[0, 64\)"):
            await rt.step({"input_ids": torch.full((1, 4), 99)})
        assert (await rt.step(token_batch(model.config))).step == 0  # still usable


def test_run_uses_uvloop_when_installed() -> None:
    uvloop = pytest.importorskip("uvloop")

    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    assert zoruntime.run(loop_type()) is uvloop.Loop


def test_a_whole_run_under_uvloop_equals_asyncio() -> None:
    async def train(model) -> list[zoruntime.StepStats]:
        async with zoruntime.Runtime(model, zoruntime.ZOSGD(lr=1e-2, seed=4), policy=FixedDepth(2)) as rt:
            return [await rt.step(token_batch(model.config, seed=i)) for i in range(3)]

    a, b = tiny_model(num_hidden_layers=3), tiny_model(num_hidden_layers=3)
    assert zoruntime.run(train(a)) == asyncio.run(train(b))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
