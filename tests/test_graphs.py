"""The CUDA-graph runner's bookkeeping (``device/graphs.py``), on the CPU: a stand-in "graph"
runs its forward again at each replay, so what is checked is which call runs eagerly, which
captures, which buffers a replay reads and writes, and when the step's inputs are copied. That
a captured graph replays the eager bits is checked on a GPU (``tests/test_cuda.py``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import tiny_model, token_batch

import zoruntime
from zoruntime.device import graphs
from zoruntime.device.graphs import CUDAGraphs
from zoruntime.models import adapter_for
from zoruntime.policies import FixedDepth, MemoryBudget
from zoruntime.zo.reference import ReferenceZO


class _Replay:
    def __init__(self, layer: graphs.Layer, buffer: torch.Tensor, inputs: dict[str, Any]) -> None:
        self.layer, self.buffer, self.inputs = layer, buffer, inputs

    def replay(self) -> None:
        self.buffer.copy_(self.layer(self.buffer, self.inputs))


class _StandInGraphs(CUDAGraphs):
    def _capture(self, layer: graphs.Layer, buffer: torch.Tensor, inputs: dict[str, Any]) -> _Replay:
        return _Replay(layer, buffer, inputs)


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch) -> CUDAGraphs:
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: None)
    return _StandInGraphs(torch.device("cpu"))


def _layer(weight: float) -> graphs.Layer:
    """A block: reads its hidden state, a mask and a pair of tables from the step's inputs."""
    return lambda hidden, kw: hidden * weight + kw["mask"].sum() + kw["tables"][0] * kw["tables"][1]


def _inputs(step: int) -> dict[str, Any]:
    return {"mask": torch.full((2, 3), float(step)), "tables": (torch.tensor(step + 1.0), torch.tensor(2.0)),
            "position_ids": None}  # fmt: skip


def test_a_forward_runs_eagerly_then_is_captured_then_replayed_on_each_steps_inputs(runner: CUDAGraphs) -> None:
    blocks = {"block.0": _layer(2.0), "block.1": _layer(-0.5)}
    for step in range(4):
        kwargs = _inputs(step)
        for probe in range(2):
            hidden = torch.full((2, 3), probe + 10.0 * step)  # the embedding's output: new each step
            expected = hidden.clone()
            for name, layer in blocks.items():
                expected = layer(expected, kwargs)
                hidden = runner.forward(name, probe, layer, hidden, kwargs)
            assert torch.equal(hidden, expected)
            if step:  # replayed: the probe's own buffer, the blocks' outputs written there in place
                assert hidden is runner._hidden[(probe, graphs._signature(hidden, kwargs))]
        assert len(runner._graphs) == (0 if step == 0 else 4)  # captured at the second step, once
    assert len({id(buffer) for buffer in runner._hidden.values()}) == 2  # a buffer a probe


def test_another_shape_runs_eagerly_first_and_has_graphs_of_its_own(runner: CUDAGraphs) -> None:
    layer, kwargs = _layer(3.0), _inputs(0)
    for shape in ((2, 3), (2, 3), (4, 3), (4, 3), (2, 3)):
        hidden = torch.ones(shape)
        assert torch.equal(runner.forward("block.0", 0, layer, hidden, kwargs), layer(torch.ones(shape), kwargs))
    assert len(runner._graphs) == 2 and len(runner._hidden) == 2


def test_an_input_a_graph_cannot_hold_is_refused_by_name(runner: CUDAGraphs) -> None:
    with pytest.raises(TypeError, match="a layer input of type list cannot be captured in a CUDA graph"):
        runner.forward("block.0", 0, _layer(1.0), torch.ones(2), {"mask": [1, 2]})


RUNS = {
    "depth 1": (FixedDepth(1), {}),
    "resident, writing back every 2 steps": ("budget", {}),
    "two directions": (FixedDepth(2), {"directions": 2}),
    "one-sided, three directions": (FixedDepth(1), {"directions": 3, "estimator": "one-sided"}),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("family", ["pre_ln_tied", "llama_gqa"])
@pytest.mark.parametrize("run", sorted(RUNS))
async def test_the_runtime_through_the_runner_equals_the_reference(runner: CUDAGraphs, family: str, run: str) -> None:
    """The runner in the runtime's place (set by hand: ``cuda_graphs=True`` asks for a GPU): the
    blocks' outputs flow through each probe's buffer into the next block and the head, padded
    batches bring their masks (and the Llama family its rotary tables) each step; resident and
    streamed blocks alike, a graph for each perturbed probe (the one-sided estimator's forward at
    θ runs eagerly), then an evaluation, which runs eagerly."""
    policy, options = RUNS[run]
    config = zoruntime.ZOSGD(lr=1e-2, eps=1e-3, weight_decay=0.1, seed=3, **options)
    ref_model = tiny_model(family, seed=1, num_hidden_layers=4)
    ref = ReferenceZO(ref_model, config)
    expected = [ref.step(token_batch(ref_model.config, seed=i)) for i in range(4)]
    model = tiny_model(family, seed=1, num_hidden_layers=4)
    if policy == "budget":
        policy = MemoryBudget(6 * adapter_for(model).block_layouts[0].nbytes, offload_every=2)
    async with zoruntime.Runtime(model, config, policy=policy) as rt:
        assert rt._work is not None and (run != "resident, writing back every 2 steps") == (not rt.plan.resident)
        rt._work.graphs = runner
        got = [await rt.step(token_batch(model.config, seed=i)) for i in range(4)]
        evaluated = await rt.evaluate(token_batch(model.config, seed=9))
    assert got == expected
    perturbed = 2 * config.directions if config.estimator == "two-sided" else config.directions
    assert len(runner._graphs) == 4 * perturbed
    assert evaluated == pytest.approx(ref.evaluate(token_batch(ref_model.config, seed=9)), rel=0, abs=0)
    for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)


class _OffByOne(_Replay):
    def replay(self) -> None:
        self.buffer.copy_(self.layer(self.buffer, self.inputs) + 1)


class _WrongGraphs(CUDAGraphs):
    """A stand-in whose graph of ``wrong`` (block, probe) replays other bits than its forward."""

    wrong = ("block.1", 0)

    def forward(self, name: str, probe: int, layer: graphs.Layer, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
        self._replaying = (name, probe)
        return super().forward(name, probe, layer, hidden, kwargs)

    def _capture(self, layer: graphs.Layer, buffer: torch.Tensor, inputs: dict[str, Any]) -> _Replay:
        return (_OffByOne if self._replaying == self.wrong else _Replay)(layer, buffer, inputs)


def test_each_capture_is_checked_against_its_eager_forward(runner: CUDAGraphs) -> None:
    layer, kwargs = _layer(2.0), _inputs(0)
    for _ in range(3):  # eager, capture (checked), replay
        runner.forward("block.0", 0, layer, torch.ones(2, 3), kwargs)
    assert [(name, probe, bool(differs)) for name, probe, differs in runner._checks] == [("block.0", 0, False)]
    runner.confirm()  # the stand-in replays the forward itself: nothing differs
    assert runner._checks == []  # each capture is checked once


@pytest.mark.asyncio
async def test_a_graph_that_replays_other_bits_drops_its_step_and_the_run_goes_on_eagerly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At the step that captures (the second), block.1's graph for probe 0 is off by one: the step
    raises naming it, logs no update and is counted failed; the runtime leaves graphs off and the
    same step called again continues the run bitwise as the reference's."""
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: None)
    config = zoruntime.ZOSGD(lr=1e-2, eps=1e-3, weight_decay=0.1, seed=3)
    ref_model = tiny_model(seed=1, num_hidden_layers=3)
    ref = ReferenceZO(ref_model, config)
    expected = [ref.step(token_batch(ref_model.config, seed=i)) for i in range(3)]
    model = tiny_model(seed=1, num_hidden_layers=3)
    async with zoruntime.Runtime(model, config, policy=FixedDepth(1)) as rt:
        assert rt._work is not None
        rt._work.graphs = _WrongGraphs(torch.device("cpu"))
        got = [await rt.step(token_batch(model.config, seed=0))]
        with pytest.raises(graphs.GraphMismatch, match=r"^the CUDA graph captured for block.1 \(probe 0\) gave other "
                           r"bits than its eager forward \(1 of 6 graphs captured this step differed\)"):  # fmt: skip
            await rt.step(token_batch(model.config, seed=1))
        assert rt._work.graphs is None and rt.step_index == 1 and rt.statistics().failed_steps == 1
        got += [await rt.step(token_batch(model.config, seed=i)) for i in (1, 2)]
    assert got == expected
    for a, b in zip(ref_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
