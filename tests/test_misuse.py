"""The API under misuse loses nothing: two calls at once, a step left running when the block
ends, a close that is cancelled or fails, a sequence with no attended token, an evaluation
that is not finite. Each is refused clearly or waited for, and every weight reaches the model."""

from __future__ import annotations

import asyncio
import math
import re

import pytest
import torch
from conftest import tiny_model, token_batch

import zoruntime
from zoruntime.models.batch import make_batch
from zoruntime.models.opt import OPTAdapter
from zoruntime.policies import FixedDepth, MemoryBudget
from zoruntime.testing import InjectedFault, inject_faults
from zoruntime.zo.reference import ReferenceZO

BLOCKS = 4
CONFIG = zoruntime.ZOSGD(lr=1e-2, eps=1e-3, weight_decay=0.1, seed=7)
BUSY = (
    "rt.step() was called while another step runs; await each call before the next (rt.step() has not "
    "finished: a runtime runs one step, evaluation or flush at a time, so two calls given to asyncio.gather() "
    "or create_task() at once are refused)"
)
STILL_OPEN = (
    "the runtime is still open and holds every weight (the pending update is kept, not lost): "
    "await rt.close() again to write them back into the model"
)


def _model() -> torch.nn.Module:
    return tiny_model(seed=2, num_hidden_layers=BLOCKS)


def _policy(name: str):
    block = OPTAdapter(_model()).block_layouts[0].nbytes
    return {"depth1": FixedDepth(1), "resident": MemoryBudget(5 * block)}[name]


def _batch(seed: int) -> dict[str, torch.Tensor]:
    return token_batch(_model().config, seed=seed)


def _one_step_by_the_reference(seed: int = 0) -> torch.nn.Module:
    model = _model()
    ReferenceZO(model, CONFIG).step(_batch(seed))
    return model


async def _one_step_alone(policy: str, seed: int = 0) -> tuple[torch.nn.Module, zoruntime.StepStats]:
    model = _model()
    async with zoruntime.Runtime(model, CONFIG, policy=_policy(policy)) as rt:
        stats = await rt.step(_batch(seed))
    return model, stats


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def _resident_group_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    pa, pb = OPTAdapter(a).embed_head_parameters(), OPTAdapter(b).embed_head_parameters()
    return all(torch.equal(pa[name], pb[name]) for name in pa)


# -- 1a: two steps at once ---------------------------------------------------------------------
@pytest.mark.asyncio
@pytest.mark.parametrize("policy", ["depth1", "resident"])
async def test_two_steps_given_to_gather_refuse_the_second_and_every_weight_is_written_back(policy: str) -> None:
    alone, _ = await _one_step_alone(policy)
    model = _model()
    rt = zoruntime.Runtime(model, CONFIG, policy=_policy(policy))
    async with rt:
        with pytest.raises(RuntimeError) as refused:
            await asyncio.gather(rt.step(_batch(0)), rt.step(_batch(1)))  # the first keeps running
        assert str(refused.value) == BUSY
    statistics = rt.statistics()
    assert (statistics.steps, statistics.failed_steps, statistics.skipped_steps) == (1, 0, 0)
    assert not statistics.pending_update
    assert _resident_group_equal(model, alone)  # embeddings, final norm, head: the part that was lost
    assert _same_weights(model, alone)
    assert _same_weights(model, _one_step_by_the_reference())


@pytest.mark.asyncio
async def test_the_refused_call_touches_nothing_and_the_running_step_completes_normally() -> None:
    alone, expected = await _one_step_alone("depth1")
    model = _model()
    async with zoruntime.Runtime(model, CONFIG, policy=FixedDepth(1)) as rt:
        first, second = await asyncio.gather(rt.step(_batch(0)), rt.step(_batch(1)), return_exceptions=True)
        assert first == expected
        assert isinstance(second, RuntimeError) and str(second) == BUSY
        assert rt.step_index == 1 and rt.statistics().failed_steps == 0
    assert _same_weights(model, alone)


# -- 1b: leaving the block with a step still running --------------------------------------------
@pytest.mark.asyncio
@pytest.mark.parametrize("started", [True, False])
async def test_leaving_the_block_waits_for_a_step_left_running_then_writes_every_weight_back(started: bool) -> None:
    alone, expected = await _one_step_alone("depth1")
    model = _model()
    rt = zoruntime.Runtime(model, CONFIG, policy=FixedDepth(1))
    async with rt:
        running = asyncio.create_task(rt.step(_batch(0)))
        if started:
            await asyncio.sleep(0)  # the step is on the lanes now
    assert running.done() and running.result() == expected
    assert rt.statistics().failed_steps == 0
    assert _same_weights(model, alone)
    assert _same_weights(model, _one_step_by_the_reference())


@pytest.mark.asyncio
async def test_a_call_made_while_the_runtime_closes_is_refused_and_changes_nothing() -> None:
    alone, expected = await _one_step_alone("depth1")
    model = _model()

    async def two_steps() -> list[zoruntime.StepStats]:
        done = [await rt.step(_batch(0))]
        done.append(await rt.step(_batch(1)))  # issued once the block has been left: refused
        return done

    rt = zoruntime.Runtime(model, CONFIG, policy=FixedDepth(1))
    async with rt:
        task = asyncio.create_task(two_steps())
        await asyncio.sleep(0)
    with pytest.raises(RuntimeError) as refused:
        await task
    assert str(refused.value) == (
        "rt.step() was called while the runtime closes (leaving `async with` writes the weights back); "
        "call it inside the block and await it there"
    )
    assert rt.step_index == 1 and expected.step == 0
    assert _same_weights(model, alone)


@pytest.mark.asyncio
async def test_a_close_cancelled_while_it_waits_keeps_the_runtime_open_and_the_weights_in_it() -> None:
    alone, expected = await _one_step_alone("depth1")
    model = _model()
    rt = zoruntime.Runtime(model, CONFIG, policy=FixedDepth(1))
    await rt.open()
    running = asyncio.create_task(rt.step(_batch(0)))
    await asyncio.sleep(0)
    closing = asyncio.create_task(rt.close())
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError) as cancelled:
        await closing
    assert cancelled.value.__notes__ == [STILL_OPEN]
    assert await running == expected  # the lanes were not shut under it
    assert (await rt.step(_batch(1))).step == 1  # still open, still usable
    await rt.close()
    twice = _model()
    async with zoruntime.Runtime(twice, CONFIG, policy=FixedDepth(1)) as ref:
        await ref.step(_batch(0))
        await ref.step(_batch(1))
    assert _same_weights(model, twice)
    assert not _same_weights(model, alone)


@pytest.mark.asyncio
async def test_a_flush_that_fails_on_leaving_keeps_the_weights_and_close_again_writes_them() -> None:
    alone, _ = await _one_step_alone("depth1")
    model = _model()
    rt = zoruntime.Runtime(model, CONFIG, policy=FixedDepth(1))
    with pytest.raises(zoruntime.TaskFailed) as failed:
        async with rt:
            await rt.step(_batch(0))
            injected = inject_faults(
                rt, lambda step, task: task.kind.value == "offload" and task.subject == "embed_head" and not injected
            )
    assert str(failed.value) == (
        "step 1: offload of embed_head failed: InjectedFault: fault injected into offload of embed_head of step 1"
    )
    assert isinstance(failed.value.__cause__, InjectedFault)
    assert failed.value.__notes__ == [STILL_OPEN]
    assert not _resident_group_equal(model, alone)  # not yet written back, but not lost either
    await rt.close()
    assert _same_weights(model, alone)
    assert _same_weights(model, _one_step_by_the_reference())


# -- 1c: a sequence with no attended token ---------------------------------------------------------
def test_an_all_zero_attention_mask_row_is_refused_naming_the_row() -> None:
    config = _model().config
    batch = token_batch(config)
    batch["attention_mask"][2] = 0
    with pytest.raises(ValueError) as one:
        make_batch(batch, vocab_size=config.vocab_size, max_positions=config.max_position_embeddings)
    assert str(one.value) == (
        "attention_mask row 2 is all 0 (padding): such a sequence has no token to attend to or to score, so its "
        "hidden states and loss are not defined (a batch of them gives a NaN loss); drop the row from the batch, "
        "or set attention_mask to 1 on at least one of its tokens"
    )
    batch["attention_mask"][0] = 0
    with pytest.raises(ValueError, match=r"^attention_mask rows 0, 2 are all 0 \(padding\): "):
        make_batch(batch, vocab_size=config.vocab_size, max_positions=config.max_position_embeddings)


@pytest.mark.parametrize("label", [64, 10**6, -5])
def test_labels_outside_the_vocabulary_are_refused_by_value(label: int) -> None:
    """A label the head has no row for would index past it (or, below the vocabulary's size in a
    piece, score some other row silently); -100 alone means not scored."""
    config = _model().config
    batch = token_batch(config)
    batch["labels"][1, 5] = label
    assert config.vocab_size == 64
    expected = rf"^labels must be token ids in \[0, 64\) or -100 \(not scored\), found {label};"
    with pytest.raises(ValueError, match=expected):
        make_batch(batch, vocab_size=config.vocab_size, max_positions=config.max_position_embeddings)


@pytest.mark.parametrize("value", [0.4, 1.7, math.nan])
def test_an_attention_mask_of_other_values_than_0_and_1_is_refused_before_any_cast(value: float) -> None:
    config = _model().config
    batch = token_batch(config)
    mask = batch["attention_mask"].float()
    mask[0, :4] = value  # as long(), 0.4 would silently become padding and 1.7 a token
    with pytest.raises(ValueError, match=r"^attention_mask must hold only 0 \(padding\) and 1 \(token\)$"):
        make_batch({**batch, "attention_mask": mask}, vocab_size=config.vocab_size,
                   max_positions=config.max_position_embeddings)  # fmt: skip
    exact = make_batch({**batch, "attention_mask": batch["attention_mask"].float()}, vocab_size=config.vocab_size,
                       max_positions=config.max_position_embeddings)  # fmt: skip
    assert exact.attention_mask is not None and torch.equal(exact.attention_mask, batch["attention_mask"])


@pytest.mark.asyncio
async def test_a_batch_with_no_attended_token_is_a_value_error_not_a_skipped_nan_step() -> None:
    model = _model()
    batch = _batch(0)
    batch["attention_mask"][:] = 0
    async with zoruntime.Runtime(model, CONFIG) as rt:
        with pytest.raises(ValueError, match=r"^attention_mask rows 0, 1, 2 are all 0 \(padding\)"):
            await rt.step(batch)
        with pytest.raises(ValueError, match=r"^attention_mask rows 0, 1, 2 are all 0 \(padding\)"):
            await rt.evaluate(batch)
        statistics = rt.statistics()
        assert (statistics.steps, statistics.skipped_steps, statistics.failed_steps) == (0, 0, 0)


@pytest.mark.asyncio
@pytest.mark.parametrize("unscored", ["labels", "one token"])
async def test_a_training_batch_with_no_token_to_score_is_a_value_error_not_a_skipped_nan_step(unscored: str) -> None:
    """Every label -100, or rows of one token (nothing after it to predict): the causal-LM loss is
    a mean over nothing. A loss of the user's own may score such a batch: it is not refused then."""
    model = _model()
    batch = _batch(0)
    batch = {**batch, "labels": torch.full_like(batch["labels"], -100)} if unscored == "labels" else {
        "input_ids": batch["input_ids"][:, :1]}  # fmt: skip
    async with zoruntime.Runtime(model, CONFIG) as rt:
        with pytest.raises(ValueError, match=r"^the batch has no token to score: every label after a row's first "
                                             r"token is -100 or padding"):  # fmt: skip
            await rt.step(batch)
        assert rt.statistics().steps == 0 and rt.step_index == 0  # no seed spent
    own = zoruntime.Runtime(model, CONFIG, loss_fn=lambda logits, batch: logits.float().mean())
    async with own:
        assert not (await own.step(batch)).skipped


# -- 1d: evaluation is never a silent nan ------------------------------------------------------------
@pytest.mark.asyncio
@pytest.mark.parametrize("bad", [math.nan, math.inf])
async def test_evaluating_non_finite_weights_raises_instead_of_returning_nan(bad: float) -> None:
    model = _model()
    with torch.no_grad():
        model.model.decoder.layers[1].fc2.weight.fill_(bad)
    async with zoruntime.Runtime(model, CONFIG) as rt:
        with pytest.raises(FloatingPointError) as error:
            await rt.evaluate(_batch(0))
    assert str(error.value) == (
        "evaluation loss is nan: the weights or the batch give non-finite logits or loss; look for inf or nan "
        "in the model's parameters (a diverged run: lower lr or eps) and check that the batch has labels other "
        "than -100 (the pending update was applied as usual)"
    )


@pytest.mark.asyncio
async def test_a_metric_that_returns_nan_raises_and_the_runtime_stays_usable() -> None:
    model = _model()
    async with zoruntime.Runtime(model, CONFIG) as rt:
        with pytest.raises(FloatingPointError) as error:
            await rt.evaluate(_batch(0), metric=lambda logits, batch: logits.sum() * math.nan)
        assert str(error.value) == (
            "evaluation metric is nan: metric(logits, batch) returned a non-finite value; check the metric (an "
            "empty selection gives 0/0 = nan) and the weights (inf or nan weights give non-finite logits)"
        )
        assert math.isfinite(await rt.evaluate(_batch(0)))
        assert (await rt.step(_batch(0))).step == 0


@pytest.mark.asyncio
async def test_closing_frees_the_compute_buffers_without_the_garbage_collector() -> None:
    import gc
    import weakref

    model = _model()
    gc.disable()
    try:
        async with zoruntime.Runtime(model, CONFIG) as rt:
            await rt.step(_batch(0))
            assert rt._work is not None
            buffers = [weakref.ref(t) for t in rt._work.storage.slots]
            assert all(ref() is not None for ref in buffers)
        assert all(ref() is None for ref in buffers)
    finally:
        gc.enable()


def test_master_weights_of_another_dtype_than_32_or_16_bits_are_refused_at_construction() -> None:
    """fp64 ran a first step, then every update failed (stochastic rounding is for 16-bit
    masters) and the runtime could not close: refused before anything runs."""
    with pytest.raises(ValueError, match=r"^zoruntime trains float32, float16 or bfloat16 master weights; these are "
                                         r"torch.float64: convert the model first \(model.float\(\)"):  # fmt: skip
        zoruntime.Runtime(_model().double(), CONFIG)


@pytest.mark.parametrize(("dtype", "eps"), [(torch.float16, 1e-10), (torch.bfloat16, 1e-45)])
def test_an_eps_that_rounds_to_zero_in_the_compute_dtype_is_refused(dtype: torch.dtype, eps: float) -> None:
    """Nothing would be perturbed, every g 0/0 and every step skipped as non-finite."""
    with pytest.raises(ValueError, match=rf"^eps {eps:g} rounds to 0 in {dtype}, so nothing would be perturbed"):
        zoruntime.Runtime(_model().to(dtype), zoruntime.ZOSGD(lr=1e-3, eps=eps))
    zoruntime.Runtime(_model().to(dtype), zoruntime.ZOSGD(lr=1e-3, eps=1e-7))  # a subnormal eps still perturbs


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": "1e-3"}, "lr must be a finite number >= 0, got '1e-3'"),
        ({"lr": True}, "lr must be a finite number >= 0, got True"),
        ({"eps": "x"}, "eps must be a finite number > 0, got 'x'"),
        ({"weight_decay": None}, "weight_decay must be a finite number >= 0, got None"),
    ],
)
def test_optimizer_values_of_the_wrong_type_are_refused_naming_the_field(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        zoruntime.ZOSGD(**options)


def test_a_schedule_that_returns_no_number_names_itself() -> None:
    with pytest.raises(ValueError, match=r"^lr_schedule\(3\) must return a number, got 'x'$"):
        zoruntime.ZOSGD(lr_schedule=lambda step: "x").lr_at(3)
    assert zoruntime.ZOSGD(lr_schedule=lambda step: torch.tensor(0.5)).lr_at(0) == 0.5  # a 0-d tensor is a number


@pytest.mark.asyncio
async def test_a_second_runtime_over_a_model_an_open_one_holds_is_refused_until_it_closes() -> None:
    model = _model()
    async with zoruntime.Runtime(model, CONFIG) as rt:
        await rt.step(_batch(0))
        second = zoruntime.Runtime(model, CONFIG)
        with pytest.raises(RuntimeError, match=r"^another open Runtime holds this model: close it first"):
            await second.open()
        await rt.step(_batch(1))  # the first goes on, untouched
    async with second:  # once it closed, the model is free
        await second.step(_batch(2))


@pytest.mark.asyncio
@pytest.mark.parametrize(("loss_fn", "what"), [(lambda logits, batch: logits.mean(-1), "a tensor of shape (3, 12)"),
                                               (lambda logits, batch: 1.0, "1.0")])  # fmt: skip
async def test_a_loss_fn_that_returns_no_single_number_fails_its_step_saying_so(loss_fn, what: str) -> None:
    model = _model()
    async with zoruntime.Runtime(model, CONFIG, loss_fn=loss_fn) as rt:
        with pytest.raises(Exception, match=re.escape(f"loss_fn must return the batch's loss as a one-element tensor, "
                                                      f"got {what}")):  # fmt: skip
            await rt.step(_batch(0))
    with pytest.raises(
        TypeError, match=r"^compute_dtype must be a torch.dtype \(torch.bfloat16, say\), got 'float16'$"
    ):
        zoruntime.Runtime(model, CONFIG, compute_dtype="float16")  # type: ignore[arg-type]


@pytest.mark.parametrize("path", ["lanes", "one trip"])  # CPU's thread lanes; CUDA's pass in one trip
@pytest.mark.parametrize("policy", [FixedDepth(0), FixedDepth(1), FixedDepth(2, offload_every=3)])
def test_one_event_loop_a_call_trains_exactly_as_one_loop_does(policy: FixedDepth, path: str, request) -> None:
    """A synchronous helper (one ``zoruntime.run`` a call): the loop that ran a call ends, and
    with it the work left running behind it; the next call goes on under its own loop. It was
    "Event loop is closed" on the next step, or a hang, and the last update never written back."""
    if path == "one trip":
        request.getfixturevalue("one_trip")
    model, twin = _model(), _model()
    reference = ReferenceZO(twin, CONFIG)
    rt = zoruntime.Runtime(model, CONFIG, policy=policy)
    zoruntime.run(rt.open())
    for step in range(4):
        assert zoruntime.run(rt.step(_batch(step))) == reference.step(_batch(step))
        if step == 1:
            assert zoruntime.run(rt.evaluate(_batch(9))) == reference.evaluate(_batch(9))
    zoruntime.run(rt.close())
    assert rt.statistics().failed_steps == 0
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters(), strict=True))


def test_a_call_on_another_loop_while_the_runtimes_own_still_runs_is_refused() -> None:
    rt = zoruntime.Runtime(_model(), CONFIG)
    own = asyncio.new_event_loop()
    try:
        own.run_until_complete(rt.open())
        with pytest.raises(RuntimeError, match="another event loop than the one running the runtime, which has not "
                                               "ended; nothing was changed"):  # fmt: skip
            zoruntime.run(rt.step(_batch(0)))
        assert rt.step_index == 0
        own.run_until_complete(rt.step(_batch(0)))
        own.run_until_complete(rt.close())
    finally:
        own.close()
