"""Instruments, as in trio: one whose hook raises is removed and logged once; the step, the flush
and the other instruments go on as if it had never been there."""

from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch
from conftest import tiny_model, token_batch

import zoruntime
from zoruntime.runtime import Instruments

LOGGER = "zoruntime.runtime.instruments"


class Recording:
    """Records every hook call: the hook and the phase (step hooks) or the step (task hooks)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def step_started(self, step: int, time: float, phase: str) -> None:
        self.calls.append(("step_started", phase))

    def task_issued(self, step: int, task: object, time: float) -> None:
        self.calls.append(("task_issued", step))

    def task_started(self, step: int, task: object, time: float) -> None:
        self.calls.append(("task_started", step))

    def task_finished(self, step: int, task: object, time: float) -> None:
        self.calls.append(("task_finished", step))

    def step_finished(self, step: int, time: float, phase: str) -> None:
        self.calls.append(("step_finished", phase))


class Faulty(Recording):
    """Raises in its third ``task_finished``: in the middle of the first training step."""

    def task_finished(self, step: int, task: object, time: float) -> None:
        super().task_finished(step, task, time)
        if self.calls.count(("task_finished", 0)) == 3:
            raise ValueError("broken instrument")

    def __repr__(self) -> str:
        return "<Faulty instrument>"


def _removals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and "instrument removed" in r.getMessage()]


async def _train(instruments: list[object]) -> dict[str, torch.Tensor]:
    model = tiny_model(num_hidden_layers=4)
    async with zoruntime.Runtime(model, zoruntime.ZOSGD(lr=1e-2, eps=1e-3, seed=3), instruments=instruments) as rt:
        for step in range(3):
            await rt.step(token_batch(model.config, seed=step))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}  # written back by the flush


@pytest.mark.asyncio
async def test_a_raising_instrument_is_removed_and_logged_once_and_changes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    alone = Recording()
    expected = await _train([alone])
    faulty, witness = Faulty(), Recording()
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        weights = await _train([faulty, witness])

    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert faulty.calls[-1] == ("task_finished", 0)  # the failing call: none of its hooks was called after it
    assert faulty.calls.count(("task_finished", 0)) == 3 and ("step_started", "step") in faulty.calls
    assert Counter(witness.calls) == Counter(alone.calls)  # every call, as without the faulty one (lanes interleave)
    assert alone.calls.count(("step_finished", "step")) == 3 and alone.calls[-1] == ("step_finished", "flush")
    (record,) = _removals(caplog)
    assert record.levelno == logging.ERROR
    assert "'task_finished'" in record.getMessage() and "<Faulty instrument>" in record.getMessage()
    assert record.exc_info is not None and isinstance(record.exc_info[1], ValueError)
    assert "broken instrument" in caplog.text  # the traceback


def test_removal_takes_every_hook_of_the_instrument_and_only_its(caplog: pytest.LogCaptureFixture) -> None:
    class Raising:
        def step_started(self, step: int, time: float, phase: str) -> None:
            raise RuntimeError("no")

        def task_issued(self, *args: object) -> None:
            raise AssertionError("called after its removal")

    other = Recording()
    instruments = Instruments([Raising(), other])
    with caplog.at_level(logging.ERROR, logger=LOGGER):
        for step in range(2):
            instruments.call("step_started", step, 0.0, "step")
            instruments.call("task_issued", 0, None, 0.0)
    assert other.calls == [("step_started", "step"), ("task_issued", 0)] * 2
    assert len(_removals(caplog)) == 1

    only = Instruments([Raising()])
    with caplog.at_level(logging.CRITICAL, logger=LOGGER):
        only.call("step_started", 0, 0.0, "step")
    assert not only and "task_issued" not in only  # nobody listens any more: no hook calls at all
