"""Failure without damage: a task that raises abandons its step, not the weights; a non-finite
loss skips the update; the runtime stays usable and ends bitwise where a clean run ends."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import tiny_model, token_batch

import zoruntime
from zoruntime.models import adapter_for
from zoruntime.models.opt import OPTAdapter
from zoruntime.policies import FixedDepth, MemoryBudget, Plan, out_of_memory_advice
from zoruntime.runtime import Task
from zoruntime.storage import model_layout
from zoruntime.testing import InjectedFault, inject_faults
from zoruntime.zo import update
from zoruntime.zo.reference import ReferenceZO

BLOCKS = 5
CONFIG = zoruntime.ZOSGD(lr=1e-2, eps=1e-3, weight_decay=0.1, seed=7)


def _model() -> torch.nn.Module:
    return tiny_model(seed=2, num_hidden_layers=BLOCKS)


def _weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def _policy(name: str):
    block = OPTAdapter(_model()).block_layouts[0].nbytes
    return {
        "depth1": FixedDepth(1),
        "serial": FixedDepth(0),
        "resident": MemoryBudget(5 * block),  # 3 slots + 1 working + 1 resident
        "lagging": FixedDepth(1, offload_every=3),
    }[name]  # lagging: steps 0 and 1 write nothing back


FAULTS = [
    ("embed", "embed"), ("upload", "block.0"), ("compute", "block.2"), ("compute", "block.3"), ("offload", "block.1"),
    ("upload", "block.4"), ("offload", "block.4"), ("head", "head"),
]  # fmt: skip


@pytest.mark.asyncio
@pytest.mark.parametrize("policy", ["depth1", "serial", "resident", "lagging"])
@pytest.mark.parametrize(("kind", "subject"), FAULTS)
async def test_a_failed_step_leaves_the_weights_as_they_were_and_the_run_goes_on(policy: str, kind, subject) -> None:
    await _fail_and_go_on(policy, kind, subject)


@pytest.mark.asyncio
@pytest.mark.parametrize("policy", ["depth1", "lagging"])
@pytest.mark.parametrize(("kind", "subject"), FAULTS)
async def test_the_same_when_a_pass_is_enqueued_in_one_trip(one_trip: list, policy: str, kind, subject) -> None:
    """CUDA's path: the failure ends the trip at its task, and no task is left behind."""
    await _fail_and_go_on(policy, kind, subject)
    assert len(one_trip) == 2


async def _fail_and_go_on(policy: str, kind: str, subject: str) -> None:
    clean_model, faulty_model = _model(), _model()
    async with zoruntime.Runtime(clean_model, CONFIG, policy=_policy(policy)) as clean:
        expected = [await clean.step(token_batch(clean_model.config, seed=i)) for i in range(4)]
        await clean.step(token_batch(clean_model.config, seed=0))  # 5th step: flush after 2 happens below
    async with zoruntime.Runtime(faulty_model, CONFIG, policy=_policy(policy)) as rt:
        got = [await rt.step(token_batch(faulty_model.config, seed=i)) for i in range(2)]

        def fail_once(step: int, task: Task) -> bool:
            return step == 2 and task.kind.value == kind and task.subject == subject and not injected

        injected = inject_faults(rt, fail_once)
        failing = rf"step 2: {kind}( of \S+)? failed: InjectedFault"
        try:  # a task behind the step's head (its last offloads) may fail after the step returned...
            got.append(await rt.step(token_batch(faulty_model.config, seed=2)))
        except zoruntime.TaskFailed as error:
            assert re.match(failing, str(error)) and isinstance(error.__cause__, InjectedFault)
        else:  # ...and then the next call raises it, says so, and runs nothing
            assert kind == "offload"
            with pytest.raises(zoruntime.TaskFailed, match=failing) as info:
                await rt.step(token_batch(faulty_model.config, seed=3))
            assert "failed behind that earlier pass" in "\n".join(info.value.__notes__)
        assert len(injected) == 1 and rt.statistics().failed_steps == 1
        got += [await rt.step(token_batch(faulty_model.config, seed=i)) for i in range(rt.step_index, 4)]  # the retry
        await rt.step(token_batch(faulty_model.config, seed=0))
    assert got == expected
    assert all(torch.equal(a, b) for a, b in zip(_weights(clean_model), _weights(faulty_model), strict=True))


@pytest.mark.asyncio
@pytest.mark.parametrize(("kind", "subject"), [("compute", "block.2"), ("offload", "block.1"), ("head", "head")])
async def test_after_a_failure_the_flushed_weights_equal_the_weights_before_the_step(kind, subject) -> None:
    before_model, model = _model(), _model()
    async with zoruntime.Runtime(before_model, CONFIG) as rt:
        for i in range(2):
            await rt.step(token_batch(before_model.config, seed=i))
    async with zoruntime.Runtime(model, CONFIG) as rt:
        for i in range(2):
            await rt.step(token_batch(model.config, seed=i))
        injected = inject_faults(
            rt, lambda step, task: task.kind.value == kind and task.subject == subject and not injected
        )
        with pytest.raises(zoruntime.TaskFailed):
            await rt.step(token_batch(model.config, seed=2))
    # leaving flushed: the model now holds exactly the weights of two steps, nothing lost, nothing twice
    assert all(torch.equal(a, b) for a, b in zip(_weights(before_model), _weights(model), strict=True))


@pytest.mark.asyncio
@pytest.mark.parametrize(("dtype", "policy", "failing"), [
    (torch.bfloat16, "depth1", 2),  # embed_head's final norm, after its embeddings
    (torch.bfloat16, "resident", 2),
    (torch.float32, "all_resident", 3),  # block 0's v_proj.weight, after its k_proj weight and bias
])  # fmt: skip
async def test_an_update_that_fails_part_way_on_a_group_kept_on_the_device_goes_on_where_it_stopped(
    monkeypatch, dtype: torch.dtype, policy: str, failing: int
) -> None:
    """Out of memory for the float32 temporaries of a run of a group's update (the ``failing``-th
    run of step 0's update): the group stays on the device, so its weights are the
    authoritative copy, and the retry must not update the runs before it again."""
    clean_model, model = (
        tiny_model(seed=2, num_hidden_layers=BLOCKS, dtype=dtype),
        tiny_model(seed=2, num_hidden_layers=BLOCKS, dtype=dtype),
    )
    plan = MemoryBudget(10**9) if policy == "all_resident" else _policy(policy)
    async with zoruntime.Runtime(clean_model, CONFIG, policy=plan) as clean:
        expected = [await clean.step(token_batch(clean_model.config, seed=i)) for i in range(3)]
    runs = {"count": 0}
    original = update._update_run

    def out_of_memory_once(*args, **kwargs) -> None:
        runs["count"] += 1
        if runs["count"] == failing:
            raise MemoryError("out of memory for the run's float32 temporaries")
        original(*args, **kwargs)

    monkeypatch.setattr(update, "_update_run", out_of_memory_once)
    async with zoruntime.Runtime(model, CONFIG, policy=plan) as rt:
        got = [await rt.step(token_batch(model.config, seed=0))]
        with pytest.raises(zoruntime.TaskFailed, match="MemoryError: out of memory"):
            await rt.step(token_batch(model.config, seed=1))
        got += [await rt.step(token_batch(model.config, seed=i)) for i in (1, 2)]
    assert got == expected
    assert all(torch.equal(a, b) for a, b in zip(_weights(clean_model), _weights(model), strict=True))


def _nan_on_marker(logits: torch.Tensor, batch) -> torch.Tensor:
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             batch.labels[:, 1:].reshape(-1), ignore_index=-100)  # fmt: skip
    return loss * math.nan if int(batch.input_ids[0, 0]) == 7 else loss


@pytest.mark.asyncio
async def test_a_non_finite_loss_skips_the_update_and_training_goes_on() -> None:
    batches = [token_batch(_model().config, seed=i) for i in range(5)]
    batches[2]["input_ids"][0, 0] = 7
    ref_model, model = _model(), _model()
    ref = ReferenceZO(ref_model, CONFIG, loss_fn=_nan_on_marker)
    expected = [ref.step(b) for b in batches]
    async with zoruntime.Runtime(model, CONFIG, loss_fn=_nan_on_marker) as rt:
        got = [await rt.step(b) for b in batches]
        assert rt.statistics().skipped_steps == 1
    assert [s.skipped for s in got] == [False, False, True, False, False]
    assert math.isnan(got[2].losses[0]) and got[3].step == 3
    assert [(s.step, s.losses, s.projected_grads) for s in got if not s.skipped] == [
        (s.step, s.losses, s.projected_grads) for s in expected if not s.skipped
    ]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(_weights(ref_model), _weights(model), strict=True))


@pytest.mark.asyncio
async def test_an_error_in_the_loss_names_the_head_and_the_runtime_stays_usable() -> None:
    model = _model()
    calls = []

    def flaky(logits, batch):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("labels do not fit")
        return model_adapter.causal_lm_loss(logits, batch)

    model_adapter = OPTAdapter(model)
    async with zoruntime.Runtime(model, CONFIG, loss_fn=flaky) as rt:
        with pytest.raises(zoruntime.TaskFailed, match=r"step 0: head failed: ValueError"):
            await rt.step(token_batch(model.config))
        assert (await rt.step(token_batch(model.config))).step == 0


def test_out_of_memory_advice_names_the_need_and_a_policy_that_fits() -> None:
    from zoruntime.models.init import tiny_opt_config

    model = zoruntime.random_opt(tiny_opt_config(num_hidden_layers=8))
    layout = model_layout(OPTAdapter(model), torch.float32)
    plan = FixedDepth(2).plan(layout)
    free = layout.bytes_needed(Plan(0)) + layout.unit_bytes  # serial fits with room to spare; depth 1 does not
    text = out_of_memory_advice(layout, plan, free_bytes=free, what="FixedDepth(2)")
    assert text.startswith(f"out of device memory: FixedDepth(2) needs {layout.bytes_needed(plan) / 2**30:.2f} GiB")
    assert "FixedDepth(0) needs" in text and "would fit" in text
    hopeless = out_of_memory_advice(layout, plan, free_bytes=1000, what="FixedDepth(2)")
    assert "even FixedDepth(0) needs" in hopeless
    linear = model_layout(adapter_for(model, "linear"), torch.float32)
    free = int(linear.bytes_needed(Plan(1)) / 0.85)  # a unit per linear layer fits at depth 1; whole blocks not at 0
    assert layout.bytes_needed(Plan(0)) > 0.9 * free
    finer = out_of_memory_advice(layout, plan, free_bytes=free, what="FixedDepth(2)", finer={"linear": linear})
    assert (
        f"FixedDepth(1, unit='linear') streams smaller units and needs {linear.bytes_needed(Plan(1)) / 2**30:.2f}"
        in finer
    )


@pytest.mark.asyncio
async def test_out_of_memory_at_open_suggests_finer_units_when_no_depth_fits(monkeypatch) -> None:
    from zoruntime import storage
    from zoruntime.device.cpu import CPUBackend

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    model = tiny_model(num_hidden_layers=4)
    linear = model_layout(adapter_for(model, "linear"), torch.float32).bytes_needed(Plan(1))
    monkeypatch.setattr(storage.Storage, "__init__", no_memory)
    monkeypatch.setattr(CPUBackend, "free_bytes", lambda self: int(linear / 0.85))  # linears fit at depth 1
    runtime = zoruntime.Runtime(model, CONFIG, policy=FixedDepth(1))
    with pytest.raises(MemoryError, match=r"FixedDepth\(1, unit='linear'\) streams smaller units"):
        await runtime.open()


def test_injected_faults_raise_the_documented_error() -> None:
    assert issubclass(InjectedFault, RuntimeError)
