"""Several directions per step (per upload of each block): the estimators' probes and arithmetic,
the runtime equal to the reference bitwise for q in {1, 2, 4} under several policies, dtypes and
both families, every g recorded, resume and replay exact, the memory model, directions="auto"."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, tiny_model, token_batch
from test_run_folder import same_weights, train

import zoruntime
from zoruntime.journal import Journal, Record, read_journal
from zoruntime.models import adapter_for
from zoruntime.models.groups import GroupLayout, ParamSlice
from zoruntime.models.init import meta_model
from zoruntime.models.shapes import named_config, shape_dims
from zoruntime.planning.directions import HIDDEN_WITHIN, MAX_DIRECTIONS, auto_directions
from zoruntime.planning.planner import PlanGiven, Workload, figures, predict
from zoruntime.planning.profiles import BUILT_IN, GPUProfile, profile_for_device
from zoruntime.policies import FixedDepth, MemoryBudget
from zoruntime.policies.base import Plan
from zoruntime.replay import main as replay_main
from zoruntime.replay import replay
from zoruntime.storage import model_layout
from zoruntime.zo.directions import DirectionSampler
from zoruntime.zo.estimator import OneSidedEstimator, TwoSidedEstimator, coefficients
from zoruntime.zo.reference import ReferenceZO
from zoruntime.zo.update import PendingUpdate, Rounding, draw_direction, update_group

BLOCKS = 4
SETTINGS = [(1, "two-sided"), (2, "two-sided"), (4, "two-sided"), (3, "one-sided"), (4, "one-sided")]


def _config(q: int, estimator: str, **changes: object) -> zoruntime.ZOSGD:
    return zoruntime.ZOSGD(lr=1e-2, eps=1e-3, weight_decay=0.1, seed=7, directions=q, estimator=estimator, **changes)


# -- the estimators --------------------------------------------------------------------------------
def test_the_probes_come_direction_by_direction() -> None:
    assert [(p.direction, p.scale) for p in TwoSidedEstimator(0.5, 3).probes()] == [
        (0, 0.5), (0, -0.5), (1, 0.5), (1, -0.5), (2, 0.5), (2, -0.5)
    ]  # fmt: skip
    assert [(p.direction, p.scale, p.perturbed) for p in OneSidedEstimator(0.5, 3).probes()] == [
        (0, 0.0, False), (0, 0.5, True), (1, 0.5, True), (2, 0.5, True)
    ]  # fmt: skip


def test_projected_gradients_and_coefficients_follow_the_formulas() -> None:
    losses = [torch.tensor(v) for v in (3.0, 2.0, 1.5, 2.5)]
    two = TwoSidedEstimator(0.25, 2).projected_gradients(losses)
    assert two.tolist() == [(3.0 - 2.0) / 0.5, (1.5 - 2.5) / 0.5]
    assert coefficients("two-sided", two).tolist() == [1.0, -1.0]
    g = torch.tensor([0.7])
    assert torch.equal(coefficients("two-sided", g), g)  # one direction: MeZO's g itself
    one = OneSidedEstimator(0.5, 3).projected_gradients(losses)
    assert one.tolist() == [(2.0 - 3.0) / 0.5, (1.5 - 3.0) / 0.5, (2.5 - 3.0) / 0.5]
    sigma = torch.std(one, correction=1)
    assert torch.equal(coefficients("one-sided", one), one / (3 * sigma))
    assert not torch.isfinite(coefficients("one-sided", torch.tensor([1.0, 1.0]))).any()  # σ = 0: no update


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(directions=0), "directions must be an int >= 1 or 'auto', got 0"),
        (dict(directions="many"), "directions must be an int >= 1 or 'auto', got 'many'"),
        (dict(directions=2, estimator="one-sided"), "estimator='one-sided' needs directions >= 3, got 2"),
        (dict(estimator="three-sided"), "estimator must be 'two-sided' or 'one-sided', got 'three-sided'"),
    ],
)
def test_bad_settings_are_refused_with_the_fix(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        zoruntime.ZOSGD(**changes)  # type: ignore[arg-type]


# -- the update --------------------------------------------------------------------------------------
def _layout(numel: int, dtype: torch.dtype) -> GroupLayout:
    return GroupLayout(3, (ParamSlice("w", (numel,), 0, True),), numel, dtype)


@pytest.mark.parametrize(("dtype", "rounding"), [(torch.float32, "nearest"), (torch.bfloat16, "stochastic"),
                                                 (torch.float16, "nearest")])  # fmt: skip
def test_an_update_of_several_directions_is_their_float32_sum_rounded_once_whatever_the_span(
    dtype: torch.dtype, rounding: str
) -> None:
    numel, sampler = 5000, DirectionSampler("cpu", chunk_elements=1024)
    layout = _layout(numel, dtype)
    start = torch.randn(numel, generator=torch.Generator().manual_seed(0)).to(dtype)
    update = PendingUpdate.from_gradient(4, 99, 1e-2, 0.0, torch.tensor([0.5, -2.0, 1.25]), Rounding(rounding))
    whole = start.clone()
    update_group(whole, update, layout, sampler, torch.empty(numel, dtype=dtype), torch.empty(numel))
    spans = start.clone()
    update_group(spans, update, layout, sampler, torch.empty(numel, dtype=dtype), torch.empty(700))
    assert torch.equal(whole, spans)
    if rounding == "nearest":  # by hand: Σ_d −lr·c_d·z_d in float32, in direction order, then one rounding
        zs = [draw_direction(sampler, 99, layout, torch.empty(numel, dtype=dtype), 0, d).float() for d in range(3)]
        total = zs[0] * update.scaled_grads[0]
        for d in (1, 2):
            total = torch.addcmul(total, zs[d], update.scaled_grads[d])  # fused, as the update's addcmul_
        assert torch.equal(whole, (start.float() + total).to(dtype))
    assert not torch.equal(whole, start)


def test_an_update_of_several_directions_needs_a_float32_step_buffer() -> None:
    layout, update = _layout(8, torch.float32), PendingUpdate.from_gradient(0, 1, 0.1, 0.0, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="needs a float32 step buffer"):
        update_group(torch.zeros(8), update, layout, DirectionSampler("cpu"), torch.empty(8))


# -- the runtime equals the reference --------------------------------------------------------------------
def _policy(name: str, family: str):
    block = adapter_for(tiny_model(family, num_hidden_layers=BLOCKS)).block_layouts[0].nbytes
    return {"serial": FixedDepth(0), "depth2_offload_every_2": FixedDepth(2, offload_every=2),
            "budget_some_resident": MemoryBudget(5 * block),
            "linear_depth1": FixedDepth(1, unit="linear")}[name]  # fmt: skip


async def _both(family, policy, config, steps=3, dtype=torch.float32, compute_dtype=None):
    ref_model = tiny_model(family, seed=1, dtype=dtype, num_hidden_layers=BLOCKS)
    ref = ReferenceZO(ref_model, config, compute_dtype=compute_dtype, unit=policy.unit)
    ref_stats = [ref.step(token_batch(ref_model.config, seed=i)) for i in range(steps)]
    model = tiny_model(family, seed=1, dtype=dtype, num_hidden_layers=BLOCKS)
    async with zoruntime.Runtime(model, config, policy=policy, compute_dtype=compute_dtype) as rt:
        stats = [await rt.step(token_batch(model.config, seed=i)) for i in range(steps)]
        assert rt.directions == config.directions
    return ref_model, ref_stats, model, stats


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


@pytest.mark.asyncio
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", ["serial", "depth2_offload_every_2", "budget_some_resident", "linear_depth1"])
@pytest.mark.parametrize(("q", "estimator"), SETTINGS)
async def test_runtime_equals_reference_bitwise_with_several_directions(q, estimator, policy, family) -> None:
    config = _config(q, estimator)
    ref_model, ref_stats, model, stats = await _both(family, _policy(policy, family), config)
    assert stats == ref_stats
    assert all(len(s.projected_grads) == q and len(s.losses) == (2 * q if estimator == "two-sided" else q + 1)
               for s in stats)  # fmt: skip
    assert all(s.estimator == estimator and not s.skipped for s in stats)
    _same(ref_model, model)


@pytest.mark.asyncio
@pytest.mark.parametrize(("dtype", "compute_dtype"), [(torch.bfloat16, None), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize(("q", "estimator"), [(4, "two-sided"), (3, "one-sided")])
async def test_runtime_equals_reference_with_16_bit_masters_or_compute(q, estimator, dtype, compute_dtype) -> None:
    """bf16 masters take stochastically rounded sums; fp32 masters under bf16 compute draw z into
    a direction buffer of its own, once per direction."""
    ref_model, ref_stats, model, stats = await _both(
        "pre_ln_tied", FixedDepth(1), _config(q, estimator), dtype=dtype, compute_dtype=compute_dtype
    )
    assert stats == ref_stats
    _same(ref_model, model)


@pytest.mark.asyncio
async def test_more_directions_really_probe_more_directions() -> None:
    """The q = 2 step's first direction is the q = 1 step's (same z), its second another one."""
    _, one, _, _ = await _both("pre_ln_tied", FixedDepth(1), _config(1, "two-sided"), steps=1)
    _, two, _, _ = await _both("pre_ln_tied", FixedDepth(1), _config(2, "two-sided"), steps=1)
    assert two[0].losses[:2] == one[0].losses and two[0].projected_grads[0] == one[0].projected_grads[0]
    assert two[0].losses[2:] != one[0].losses


# -- journal, replay, resume ---------------------------------------------------------------------------
@pytest.mark.asyncio
@pytest.mark.parametrize(("q", "estimator"), [(4, "one-sided"), (2, "two-sided")])
async def test_the_journal_records_every_g_and_replay_rebuilds_the_weights_bitwise(q, estimator, tmp_path) -> None:
    config = _config(q, estimator)
    model = tiny_model("llama_gqa", seed=1, num_hidden_layers=BLOCKS)
    base = tiny_model("llama_gqa", seed=1, num_hidden_layers=BLOCKS)
    async with zoruntime.Runtime(model, config, policy=FixedDepth(1, offload_every=2)) as rt:
        stats = [await rt.step(token_batch(model.config, seed=i)) for i in range(4)]
    path = tmp_path / "journal.jsonl"
    with Journal(path) as journal:
        for i, s in enumerate(stats):
            journal.append(Record.of(s, config.eps, config.weight_decay, i, "nearest"))
    read = read_journal(path)
    assert [r.projected_grads for r in read] == [list(s.projected_grads) for s in stats]
    assert all(len(r.projected_grads) == q and r.estimator == estimator for r in read)
    assert replay(base, read) == 4
    _same(model, base)


def test_a_journal_from_before_several_directions_reads_as_one_two_sided_direction(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    old = {"step": 0, "seed": 5, "lr": 0.1, "eps": 1e-3, "weight_decay": 0.0, "loss_plus": 2.0, "loss_minus": 1.0,
           "projected_grad": 500.0, "batch": 0, "skipped": False, "rounding": "nearest"}  # fmt: skip
    path.write_text(json.dumps({"zoruntime_journal": 1, "direction_scheme": 2}) + "\n" + json.dumps(old) + "\n")
    (record,) = read_journal(path)
    assert (record.losses, record.projected_grads, record.estimator) == ([2.0, 1.0], [500.0], "two-sided")


def test_train_with_several_directions_resumes_and_replays_exactly(tmp_path: Path, capsys) -> None:
    several = ["--directions", "3", "--estimator", "one-sided", "--checkpoint-every", "0"]
    clean, stopped = tmp_path / "clean", tmp_path / "stopped"
    assert train(capsys, *several, "--steps", "6", "--out", str(clean))[0] == 0
    assert train(capsys, *several, "--steps", "3", "--out", str(stopped))[0] == 0
    assert train(capsys, "--resume", str(stopped), "--steps", "6")[0] == 0
    assert same_weights(clean / "model", stopped / "model")
    records = read_journal(clean / "journal.jsonl")
    assert records == read_journal(stopped / "journal.jsonl")
    assert [len(r.projected_grads) for r in records] == [3] * 6 and {r.estimator for r in records} == {"one-sided"}
    code, _, err = train(capsys, "--resume", str(stopped), "--steps", "8", "--directions", "2")
    assert code == 2 and "--directions 2 (the run used 3)" in err
    assert replay_main(["--run", str(clean), "--out", str(tmp_path / "replayed")]) == 0
    assert same_weights(clean / "model", tmp_path / "replayed")


def test_train_refuses_bad_direction_options_in_one_line(tmp_path: Path, capsys) -> None:
    code, _, err = train(capsys, "--estimator", "one-sided", "--out", str(tmp_path / "a"))
    assert (
        code == 2
        and err.count("\n") == 1
        and "--estimator 'one-sided' needs directions >= 3, got 1" in err
        and "pass --directions 3 or more" in err
    )
    code, _, err = train(capsys, "--directions", "auto", "--gpu-profile", "nowhere.json", "--out", str(tmp_path / "b"))
    assert code == 2 and err.count("\n") == 1 and "--gpu-profile 'nowhere.json' is neither a built-in profile" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# -- memory ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_the_memory_model_counts_the_step_buffer_storage_allocates(family: str, compute_dtype: torch.dtype) -> None:
    from zoruntime.device.cpu import CPUBackend
    from zoruntime.storage import Storage

    adapter = adapter_for(tiny_model(family, num_hidden_layers=BLOCKS))
    one, several = model_layout(adapter, compute_dtype), model_layout(adapter, compute_dtype, several_directions=True)
    plan = FixedDepth(1).plan(several)
    backend = CPUBackend()
    allocated: list[torch.Tensor] = []
    allocate = backend.compute_empty
    backend.compute_empty = lambda numel, dtype: allocated.append(allocate(numel, dtype)) or allocated[-1]  # type: ignore[method-assign]
    try:
        Storage(adapter, plan, backend, compute_dtype, several.step_span)
    finally:
        backend.close()
    assert sum(t.numel() * t.element_size() for t in allocated) == several.bytes_needed(plan)
    largest = max(layout.numel for layout, _ in adapter.groups())
    assert several.bytes_needed(plan) - one.bytes_needed(plan) == 4 * largest


# -- the planner and directions="auto" --------------------------------------------------------------------
def _opt13b(batch: int = 1, seq: int = 2048) -> Workload:
    config = named_config("opt-13b")
    layout = model_layout(adapter_for(meta_model(config, torch.float16)), torch.float16, several_directions=True)
    return Workload(layout, shape_dims(config), batch, seq, "block", config.num_hidden_layers)


PCIE3_GPU = GPUProfile("pcie3", upload_gb_s=6.0, offload_gb_s=6.0, duplex=0.9, tflops=70.0, memory_gb_s=800.0,
                       gpu_memory_gb=24.0, source="a made-up card on a PCIe 3 x8 link")  # fmt: skip


@pytest.mark.parametrize("estimator", ["two-sided", "one-sided"])
@pytest.mark.parametrize("profile", [BUILT_IN["h200"], PCIE3_GPU], ids=["h200", "pcie3"])
def test_auto_is_the_largest_q_whose_forwards_hide_under_the_transfers(profile: GPUProfile, estimator: str) -> None:
    work, plan = _opt13b(batch=8, seq=128), Plan(1)

    def step_s(q: int, kind: str) -> float:
        return predict(replace(work, directions=q, estimator=kind), profile, PlanGiven(plan)).step_s

    q = auto_directions(work, profile, plan, estimator)
    limit = step_s(1, "two-sided") * (1 + HIDDEN_WITHIN)
    least = 3 if estimator == "one-sided" else 1
    assert least <= q < MAX_DIRECTIONS
    assert step_s(q, estimator) <= limit or q == least
    assert step_s(q + 1, estimator) > limit
    if profile is PCIE3_GPU:  # a slow link hides several directions' forwards
        assert q >= 2 and step_s(q, estimator) <= limit


def test_auto_counts_the_hosts_time_per_probe() -> None:
    """On the slow link an opt-13b block crosses in 105 ms (117 ms while offloads share it); a host
    that needs 10 ms a task and 20 ms a probe issues two directions' four probes in that time but
    not three's six, where the GPU alone would have hidden three."""
    work, plan = _opt13b(batch=8, seq=128), Plan(1)
    free = auto_directions(work, PCIE3_GPU, plan, "two-sided")
    slow_host = replace(PCIE3_GPU, host_task_ms=10.0, host_probe_ms=20.0)
    busy = auto_directions(work, slow_host, plan, "two-sided")
    assert (busy, free) == (2, 3)
    upload_s = figures(work, slow_host)[0].upload_s
    assert slow_host.host_s(4) < upload_s / slow_host.duplex < slow_host.host_s(6)


def test_more_probes_cost_compute_and_activations_in_the_plan() -> None:
    work, profile = _opt13b(), BUILT_IN["h200"]
    one = predict(work, profile, FixedDepth(0))
    eight = predict(replace(work, directions=8), profile, FixedDepth(0))
    assert eight.step_s > one.step_s and eight.memory["activations"] > one.memory["activations"]


@pytest.mark.asyncio
async def test_auto_on_the_cpu_takes_the_fewest_and_with_a_profile_the_planners_choice() -> None:
    model = tiny_model(num_hidden_layers=BLOCKS)
    batch = token_batch(model.config)
    for estimator, fewest in (("two-sided", 1), ("one-sided", 3)):
        async with zoruntime.Runtime(model, _config("auto", estimator)) as rt:  # type: ignore[arg-type]
            assert rt.directions is None
            stats = await rt.step(batch)
            assert rt.directions == fewest == stats.directions
    async with zoruntime.Runtime(model, _config("auto", "two-sided"), profile="h200") as rt:  # type: ignore[arg-type]
        stats = await rt.step(batch)
        rows, length = batch["input_ids"].shape
        work = Workload(rt.layout, shape_dims(model.config), rows, length, "block", BLOCKS)
        planned = await asyncio.to_thread(auto_directions, work, BUILT_IN["h200"], rt.plan, "two-sided")
        assert stats.directions == planned


def test_a_gpu_is_matched_to_its_built_in_profile_by_name() -> None:
    assert profile_for_device("NVIDIA H200") is BUILT_IN["h200"]
    assert profile_for_device("NVIDIA H100 80GB HBM3") is BUILT_IN["h100"]
    assert profile_for_device("NVIDIA GeForce RTX 4090") is None


def test_the_reference_needs_a_number_of_directions() -> None:
    with pytest.raises(ValueError, match="the reference runs a number of directions"):
        ReferenceZO(tiny_model(num_hidden_layers=1), _config("auto", "two-sided"))  # type: ignore[arg-type]


def test_plan_predicts_several_directions_and_auto_as_train_would(capsys) -> None:
    from zoruntime.plan import main as plan_main

    # within 1 GB no plan fits, so the search for the fastest is short; the policy given is still
    # predicted (and said not to fit: exit status 1)
    args = ["--model", "opt-13b", "--seq", "512", "--policy", "depth=1", "--gpu-memory", "1GB"]
    assert plan_main([*args, "--directions", "auto", "--estimator", "one-sided"]) == 1
    auto = json.loads(capsys.readouterr().out.strip().split("\n")[-1])
    work = _opt13b(seq=512)
    assert auto["directions"] == auto_directions(work, BUILT_IN["h200"], Plan(1), "one-sided")
    assert plan_main([*args, "--directions", "4"]) == 1
    four = json.loads(capsys.readouterr().out.strip().split("\n")[-1])
    assert four["step_s"] == predict(replace(work, directions=4), BUILT_IN["h200"], FixedDepth(1)).step_s
    assert plan_main([*args, "--directions", "2", "--estimator", "one-sided"]) == 2
    assert "--directions must be a number >= 3 with --estimator one-sided, or auto" in capsys.readouterr().err


def test_plan_counts_the_buffer_the_runtime_keeps_for_auto_whatever_it_decides(capsys) -> None:
    """directions="auto" keeps the float32 buffer of several directions' updates (64 MiB at
    opt-13b) even where it decides on one direction; plan and train's fit=SIZE count it too."""
    from zoruntime.plan import main as plan_main
    from zoruntime.workloads import workloads

    with_buffer = _opt13b(seq=512).layout.breakdown(Plan(1)).working
    assert with_buffer - replace(_opt13b().layout, several_directions=False).breakdown(Plan(1)).working == 2**26
    args = ["--model", "opt-13b", "--seq", "512", "--policy", "depth=1", "--gpu-memory", "1GB", "--directions", "auto"]
    assert plan_main(args) == 1  # no plan fits in 1 GB: the search is short
    result = json.loads(capsys.readouterr().out.strip().split("\n")[-1])
    assert result["directions"] == 1 and result["memory"]["working buffers (a perturbed copy)"] == with_buffer
    assert workloads(named_config("opt-13b"), torch.float16, 1, 512, auto=True)["block"].layout.several_directions
    model = tiny_model(num_hidden_layers=BLOCKS)
    assert zoruntime.Runtime(model, _config("auto", "two-sided")).layout.several_directions  # type: ignore[arg-type]
