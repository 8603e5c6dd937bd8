"""``zoruntime plan`` and the planner: memory from the memory model, times from a profile through
the simulator, the fastest plan within the memory given, a profile from the bench's card."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest
import torch

from zoruntime.models.adapter import adapter_for
from zoruntime.models.init import meta_model
from zoruntime.models.shapes import opt_config, shape_dims
from zoruntime.plan import main as plan_main
from zoruntime.planning.memory import activation_bytes, loss_pieces, show_size
from zoruntime.planning.planner import Workload, best, figures, predict, predict_memory, profile_from_card
from zoruntime.planning.profiles import BUILT_IN, GPUProfile, load_profile
from zoruntime.policies import FixedDepth, Plan
from zoruntime.storage import model_layout
from zoruntime.train.options import parse_policy
from zoruntime.workloads import workloads


def _work(name: str = "opt-1.3b", batch: int = 1, seq: int = 2048, unit: str = "block") -> Workload:
    """fp16 masters."""
    config = opt_config(name)
    layout = model_layout(adapter_for(meta_model(config, torch.float16), unit), torch.float16)
    return Workload(layout, shape_dims(config), batch, seq, unit, config.num_hidden_layers)


def test_plan_prints_a_json_line_whose_memory_is_the_memory_model_plus_activations_and_workspace(capsys) -> None:
    assert plan_main(["--model", "opt-1.3b", "--policy", "depth=1,offload=4", "--gpu-memory", "6GB"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert {"gpu_bytes", "step_s", "tokens_per_s", "floor_tokens_per_s", "ratio_to_floor", "policy"} <= set(result)
    work = _work()
    activations = activation_bytes(work.dims, 1, 2048, 2, attention_scores=False)
    workspace = 32 * 2**20  # cuBLAS's on the compute stream, on the H200
    assert result["gpu_bytes"] == work.layout.bytes_needed(Plan(1, offload_every=4)) + activations + workspace
    assert result["tokens_per_s"] == pytest.approx(2048 / result["step_s"])
    paces = result["unit_s"]  # a streamed unit's upload, its task on the GPU, the host's time to issue it
    assert set(paces) == {"the link", "the GPU", "the host"} and result["bound_by"] == max(paces, key=paces.get)
    assert paces["the host"] == pytest.approx(BUILT_IN["h200"].host_s(2))
    assert f"the host issuing it {paces['the host'] * 1e3:.2f} ms: paced by {result['bound_by']}" in out
    assert "your policy: FixedDepth(depth=1, offload_every=4, unit='block')" in out and "fastest that fits" in out


def test_the_fastest_plan_found_fits_in_the_memory_given() -> None:
    work = _work("opt-13b")
    found = {gigabytes: best(work, BUILT_IN["h200"], int(gigabytes * 1e9)) for gigabytes in (8, 24, 60)}
    for gigabytes, prediction in found.items():
        assert prediction is not None and prediction.gpu_bytes <= gigabytes * 1e9
    # more room keeps more blocks resident: faster until the step is bound by compute alone
    assert found[8].tokens_per_s < found[24].tokens_per_s <= found[60].tokens_per_s  # type: ignore[union-attr]
    assert best(work, BUILT_IN["h200"], int(1e9)) is None  # not even serial streaming fits in 1 GB


def test_a_streamed_step_is_predicted_by_the_pipeline_of_the_profiles_figures() -> None:
    """FixedDepth(1), transfer-bound: steps overlap, so a step in steady state is N uploads at
    the duplex-slowed speed (the fill is paid once, not per step)."""
    work, profile = _work("opt-13b"), BUILT_IN["h200"]
    op, _ = figures(work, profile)
    slowed = op.upload_s / profile.duplex
    predicted = predict(work, profile, FixedDepth(1))
    n = work.layout.num_units
    assert op.head_s < op.offload_s / profile.duplex
    assert predicted.step_s == pytest.approx(n * slowed, rel=1e-12)
    assert predicted.floor_tokens_per_s == pytest.approx(work.tokens / (n * op.upload_s))


def test_an_update_reads_and_writes_the_masters_once_whichever_the_rounding() -> None:
    """On a GPU a 16-bit update is one kernel (``zo/fused.py``), stochastic or to nearest: three
    accesses of the masters' width a parameter. So opt-13b's compute task stays shorter than its
    upload on the H200 profile (measured on an H200: 7.28 ms against 10.9)."""
    work = _work("opt-13b")
    assert work.update_bytes == 3 * 2
    assert replace(work, directions=2).update_bytes == 6 + 4 + 2 * (2 + 8)  # the float32 sum of two
    op, _ = figures(work, BUILT_IN["h200"])
    assert op.compute_s < op.upload_s


def test_a_profile_from_the_card_gives_back_the_cards_times(tmp_path) -> None:
    work = _work("opt-13b")
    card = {"upload_gb_s": 55.2, "offload_gb_s": 55.5, "dual_forward_ms": 3.88, "compute_task_ms": 7.65,
            "host_task_ms": 0.5, "host_probe_ms": 0.75, "host_piece_ms": 0.04}  # fmt: skip
    profile = profile_from_card("mine", card, work, gpu_memory_gb=80, duplex=0.9, source="a test")
    assert profile.host_piece_ms == 0.04
    op, _ = figures(work, profile)
    assert op.compute_s == pytest.approx(7.65e-3)
    assert op.upload_s == pytest.approx(work.layout.unit_bytes / 55.2e9)
    assert profile.host_s(2) == pytest.approx(2e-3) and profile.host_s(8) == pytest.approx(6.5e-3)
    assert load_profile(str(profile.save(tmp_path / "mine.json"))) == profile
    older = {k: v for k, v in card.items() if not k.startswith("host")}  # a card from before the host was split
    assert profile_from_card("old", older, work, 80, 0.9, "a test").host_s(8) == 0
    assert profile.host_graph_saving_ms == 0  # the card timed no forward from a graph
    with pytest.raises(ValueError, match=r"the card's compute task \(3.000 ms\) is not longer than its forwards"):
        profile_from_card("old", {**card, "compute_task_ms": 3.0}, work, 80, 0.9, "a test")
    noisy = {**card, "compute_task_ms": 3.0, "compute_rest_ms": 3.5}  # the rest timed on its own: never a difference
    op, _ = figures(work, profile_from_card("noisy", noisy, work, 80, 0.9, "a test"))
    assert op.compute_s == pytest.approx((3.88 + 3.5) / 1e3)


def test_a_forward_from_a_cuda_graph_saves_the_host_what_the_card_timed_for_each_perturbed_probe(capsys) -> None:
    """The card times a forward's host time eagerly and replayed from a graph: the difference is
    what each perturbed probe of a whole block saves with ``cuda_graphs`` (never more than a
    probe's time). A one-sided step's forward at θ runs eagerly; finer units have no graphs."""
    card = {"upload_gb_s": 55.2, "offload_gb_s": 55.5, "dual_forward_ms": 1.0, "compute_task_ms": 1.4,
            "host_task_ms": 1.2, "host_probe_ms": 0.45,
            "host_parts_ms": {"update": 0.2, "forward": 0.38, "graphed forward": 0.03}}  # fmt: skip
    work = _work("opt-1.3b")
    profile = profile_from_card("mine", card, work, gpu_memory_gb=80, duplex=0.9, source="a test")
    assert profile.host_graph_saving_ms == pytest.approx(0.35)
    graphed = replace(work, cuda_graphs=True)
    assert graphed.host_s(profile) == pytest.approx((1.2 + 2 * 0.45 - 2 * 0.35) / 1e3)
    one_sided = replace(graphed, directions=3, estimator="one-sided")  # four probes, three perturbed
    assert one_sided.host_s(profile) == pytest.approx((1.2 + 4 * 0.45 - 3 * 0.35) / 1e3)
    assert replace(graphed, unit="linear").host_s(profile) == work.host_s(profile)
    assert replace(profile, host_graph_saving_ms=9.0).host_s(2, 2) == pytest.approx(1.2e-3)  # at most a probe's
    assert (
        predict(graphed, profile, FixedDepth(1)).paces["the host"]
        < predict(work, profile, FixedDepth(1)).paces["the host"]
    )
    assert plan_main(["--model", "opt-1.3b", "--cuda-graphs", "--policy", "depth=1"]) == 0
    assert "the profile has no measured saving: as without graphs" in capsys.readouterr().out  # the built-in H200's


def test_the_plan_counts_cublas_workspace_on_each_stream_that_runs_matmuls() -> None:
    """PyTorch takes cuBLAS's workspace from its caching allocator on a stream's first matmul and
    keeps it (32 MiB on Hopper): one on the compute stream, one more where CUDA graphs are
    captured (whole blocks only); the card measures it, and a profile without it models none."""
    work, h200 = _work(), BUILT_IN["h200"]
    eager, graphed = predict(work, h200, FixedDepth(1)), predict(replace(work, cuda_graphs=True), h200, FixedDepth(1))
    key = "cuBLAS's workspaces (one a stream that runs matmuls)"
    assert eager.memory[key] == 32 * 2**20 and graphed.memory[key] == 2 * 32 * 2**20
    assert graphed.gpu_bytes - eager.gpu_bytes == 32 * 2**20  # nothing else differs
    linear = replace(_work(unit="linear"), cuda_graphs=True)  # finer units run eagerly: no capture stream
    assert predict(linear, h200, FixedDepth(1, unit="linear")).memory[key] == 32 * 2**20
    unmodelled = predict(work, replace(h200, blas_workspace_mib=0.0), FixedDepth(1))
    assert unmodelled.memory[key] == 0 and eager.gpu_bytes - unmodelled.gpu_bytes == 32 * 2**20
    card = {"upload_gb_s": 55.2, "offload_gb_s": 55.5, "dual_forward_ms": 1.0, "compute_task_ms": 1.4,
            "blas_workspace_mib": 8.125}  # fmt: skip
    assert profile_from_card("mine", card, work, 80, 0.9, "a test").blas_workspace_mib == 8.125
    del card["blas_workspace_mib"]  # a card from before it was measured
    assert profile_from_card("old", card, work, 80, 0.9, "a test").blas_workspace_mib == 0
    with pytest.raises(ValueError, match="blas_workspace_mib must be >= 0, got -1"):
        replace(h200, blas_workspace_mib=-1)


def test_a_profile_saved_before_host_times_loads_with_the_host_not_modelled(tmp_path) -> None:
    saved = {k: v for k, v in asdict(BUILT_IN["h200"]).items() if not k.startswith("host")}
    (tmp_path / "old.json").write_text(json.dumps(saved))
    assert load_profile(str(tmp_path / "old.json")) == replace(
        BUILT_IN["h200"], host_task_ms=0.0, host_probe_ms=0.0, host_piece_ms=0.0
    )
    with pytest.raises(ValueError, match="host_probe_ms must be >= 0, got -1"):
        replace(BUILT_IN["h200"], host_probe_ms=-1)


def test_a_compute_task_takes_at_least_the_hosts_time_to_issue_it() -> None:
    """opt-1.3b: a block crosses the link in 1.8 ms; a host that needs 3 ms to issue a task of
    two probes sets the pace, and every unit of the step waits for it. The floor is the link's
    and the GPU's: the host's time shows as a lower ratio to it."""
    work = _work("opt-1.3b")
    fast = replace(BUILT_IN["h200"], host_task_ms=0.0, host_probe_ms=0.0)
    slow = replace(fast, host_task_ms=1.0, host_probe_ms=1.0)
    (op_fast, _), (op_slow, _) = figures(work, fast), figures(work, slow)
    assert op_fast.compute_s < op_fast.upload_s < 3e-3 and op_slow.compute_s == pytest.approx(3e-3)
    assert op_slow.upload_s == op_fast.upload_s and op_slow.head_s == op_fast.head_s
    quick, bound = predict(work, fast, FixedDepth(1)), predict(work, slow, FixedDepth(1))
    assert bound.step_s == pytest.approx(work.layout.num_units * 3e-3 + op_slow.head_s, rel=1e-9)
    assert (quick.bound_by, bound.bound_by) == ("the link", "the host")
    assert bound.floor_tokens_per_s == quick.floor_tokens_per_s and bound.ratio_to_floor < 0.7
    several = replace(work, directions=4)  # 8 probes: 1 + 8 ms to issue
    assert figures(several, slow)[0].compute_s == pytest.approx(9e-3)


def test_the_head_takes_at_least_the_hosts_time_to_issue_its_losss_pieces() -> None:
    """opt-1.3b, 2,048 tokens: the loss takes 7 chunks of the vocabulary x 8 pieces of 256 tokens
    a probe with tensor operations, x 2 pieces of 1,024 where a GPU's kernel takes each piece (the
    planner's case); at 0.2 ms a piece the host needs 5.6 ms for two probes, where the GPU needs 1.3."""
    work = _work("opt-1.3b")
    assert loss_pieces(50272, 2048, 2048) == 56 and loss_pieces(50272, 12288, 2048) == 37 * 2
    assert loss_pieces(50272, 2048, 2048, fused_itemsize=2) == 14
    assert loss_pieces(50272, 2048, 2048, fused_itemsize=4) == 28 and loss_pieces(50272, 12288, 2048, 2) == 37
    free = replace(BUILT_IN["h200"], host_piece_ms=0.0)
    gpu_head_s = figures(work, free)[0].head_s
    assert gpu_head_s == pytest.approx(2 * 2 * 2048 * 2048 * 50272 / (free.tflops * 1e12))
    assert figures(work, replace(free, host_piece_ms=0.2))[0].head_s == pytest.approx(2 * 14 * 0.2e-3)
    assert figures(work, replace(free, host_piece_ms=0.001))[0].head_s == gpu_head_s  # the GPU's is longer
    with pytest.raises(ValueError, match="host_piece_ms must be >= 0, got -1"):
        replace(free, host_piece_ms=-1)


def test_bad_plan_inputs_are_one_line(capsys, tmp_path) -> None:
    (tmp_path / "broken.json").write_text('{"name": "x"}')
    for args, message in [
        (["--gpu", "a100"], "--gpu 'a100' is neither a built-in profile (h200, h100) nor a file"),
        (["--gpu", str(tmp_path / "broken.json")], "is not a GPU profile"),
        (["--gpu-memory", "lots"], "'lots' is not a size"),
        (["--seq", "4096"], "--seq 4096 is longer than the model's 2048 positions"),
    ]:
        assert plan_main(["--model", "opt-1.3b", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    with pytest.raises(ValueError, match="duplex must be in"):
        GPUProfile("x", 1, 1, 1.5, 1, 1, 1)


def test_plan_takes_fit_as_train_does(capsys) -> None:
    """--policy fit=SIZE plans within SIZE, as --gpu-memory SIZE (the refusal of a bad policy
    names fit=SIZE, so plan must take it)."""
    lines = []
    for args in (
        ["--policy", "fit=0.7GB"],
        ["--gpu-memory", "0.7GB"],
        ["--policy", "fit=0.7GB", "--gpu-memory", "0.7GB"],
    ):
        assert plan_main(["--model", "opt-1.3b", *args]) == 0
        lines.append(capsys.readouterr().out.strip().splitlines()[-1])
    assert lines[0] == lines[1] == lines[2]
    assert plan_main(["--model", "opt-1.3b", "--policy", "fit=0.7GB", "--gpu-memory", "24GB"]) == 2
    assert "--policy fit=0.7GB and --gpu-memory 24GB differ: give one of them" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "gigabytes"), [("opt-175b", 8), ("opt-66b", 6), ("opt-30b", 4)])
def test_big_models_fit_small_cards_with_a_unit_per_linear_layer(name: str, gigabytes: float) -> None:
    """fp16 with ZOSGD's stochastic rounding, batch 1 x 2048, the H200 profile (predictions):
    a unit per linear layer at depth 1 fits, and the fastest plan that fits (writing back every
    few steps) is near the floor: a unit takes longer to cross the link than the host takes to
    issue its task. (Measured on an H200: opt-175b's depth 1 at 0.68x the floor before linear
    layers were packed, see the README.)"""
    work, budget = _work(name, unit="linear"), int(gigabytes * 1e9)
    prediction = predict(work, BUILT_IN["h200"], FixedDepth(1, unit="linear"))
    assert prediction.gpu_bytes <= budget
    found = best(work, BUILT_IN["h200"], budget)
    assert found is not None and found.gpu_bytes <= budget and found.ratio_to_floor >= 0.9
    assert found.bound_by != "the host"
    whole = predict(_work(name), BUILT_IN["h200"], FixedDepth(1))
    assert whole.gpu_bytes > gigabytes * 1e9  # whole blocks do not fit


def test_opt_1_3b_in_0_6_gb_is_paced_by_the_host() -> None:
    """opt-1.3b's linear layers (4 to 16 MB) cross the link in 0.2 to 0.6 ms, well under the 2.1
    ms the H200's host needed to issue a task; depth 1 needs 0.65 GB with the activations HF's
    layers hold (``test_activation_memory``) and cuBLAS's workspace, so in 0.6 GB the plan runs one
    unit at a time."""
    work, budget = _work("opt-1.3b", unit="linear"), int(0.6e9)
    assert 0.6e9 < predict(work, BUILT_IN["h200"], FixedDepth(1, unit="linear")).gpu_bytes < 0.66e9
    found = best(work, BUILT_IN["h200"], budget)
    assert found is not None and found.plan.depth == 0 and found.gpu_bytes <= budget
    assert found.bound_by == "the host" and found.ratio_to_floor < 0.3
    free_host = best(work, replace(BUILT_IN["h200"], host_task_ms=0.0, host_probe_ms=0.0), budget)
    assert free_host is not None and free_host.ratio_to_floor > 2 * found.ratio_to_floor


def test_the_search_cuts_blocks_finer_only_when_memory_asks_for_it(capsys) -> None:
    """opt-1.3b: in 0.7 GB whole blocks still fit, one at a time, and beat linear layers, which
    are host-bound (see above); in 0.6 GB only linear layers fit."""
    found = {}
    for gigabytes in ("0.7", "0.6"):
        assert plan_main(["--model", "opt-1.3b", "--gpu-memory", f"{gigabytes}GB"]) == 0
        found[gigabytes] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "unit=" not in found["0.7"]["policy"] and found["0.7"]["gpu_bytes"] <= 0.7e9
    assert "unit='linear'" in found["0.6"]["policy"] and found["0.6"]["gpu_bytes"] <= 0.6e9
    for result in found.values():  # what zoruntime train --policy takes to run that very plan
        chosen = parse_policy(result["policy_arg"])
        unit = getattr(chosen, "unit", "block")
        assert predict(_work("opt-1.3b", unit=unit), BUILT_IN["h200"], chosen).gpu_bytes == result["gpu_bytes"]
    assert found["0.6"]["bound_by"] == "the host" and found["0.6"]["step_s"] > found["0.7"]["step_s"]
    whole = _work("opt-1.3b")
    for profile in (BUILT_IN["h200"], replace(BUILT_IN["h200"], host_task_ms=0.0, host_probe_ms=0.0)):
        roomy = best(whole, profile, int(24e9))
        assert roomy is not None and roomy.plan.resident  # more room: units kept resident
        streamed = predict(whole, profile, FixedDepth(1))
        if profile.host_s(2) > 0:  # the host issues every block's task, resident or not: no faster
            assert roomy.tokens_per_s == pytest.approx(streamed.tokens_per_s)
        else:
            assert roomy.tokens_per_s > streamed.tokens_per_s


@pytest.mark.parametrize("value", [True, float("inf"), float("nan"), "55"])
def test_a_profile_figure_that_is_no_finite_number_is_refused_naming_it(value: object) -> None:
    """A JSON true was taken as 1 GB/s and 1e400 as infinitely fast."""
    figures = {**asdict(BUILT_IN["h200"]), "upload_gb_s": value}
    with pytest.raises(ValueError, match=rf"profile 'h200': upload_gb_s must be a finite number, got {value!r}"):
        GPUProfile(**figures)


@pytest.mark.parametrize(("field", "value"), [("name", 5), ("name", None), ("source", ["measured"])])
def test_a_profile_whose_name_or_source_is_no_text_is_refused_naming_it(tmp_path, capsys, field, value) -> None:
    """A JSON "name": 5 was taken as the GPU's name: plan printed "on the 5 profile" and its JSON
    line's "gpu" became a number."""
    path = tmp_path / "123.json"
    path.write_text(json.dumps({**asdict(BUILT_IN["h200"]), field: value}))
    assert plan_main(["--model", "opt-125m", "--gpu", str(path)]) == 2
    error = f"a GPU profile's {field} must be text, got {value!r}"
    assert capsys.readouterr().err == f"zoruntime plan: error: {path} is not a GPU profile (ValueError: {error})\n"


def test_a_profile_is_made_from_a_card_of_whole_blocks_and_keeps_what_a_cut_block_costs_the_host(tmp_path) -> None:
    """The card times whole blocks: a finer unit's flops over a block's time gave a third of the
    rate at linear units (``bench --unit linear --save-profile`` predicted each linear unit's task
    as long as a block's). A card of a cut block also times the host issuing its units' tasks."""
    card = {"upload_gb_s": 55.2, "offload_gb_s": 55.5, "dual_forward_ms": 3.88, "compute_task_ms": 7.65,
            "host_task_ms": 1.2, "host_probe_ms": 0.45, "unit": "linear", "units_per_block": 3,
            "unit_tasks_enqueue_ms": 1.5}  # fmt: skip
    with pytest.raises(
        ValueError, match="the card times whole blocks: give a Workload of whole blocks, not of 'linear' units"
    ):
        profile_from_card("mine", card, _work("opt-13b", unit="linear"), 80, 0.9, "a test")
    profile = profile_from_card("mine", card, _work("opt-13b"), 80, 0.9, "a test")
    assert profile.host_cut_ms == {"linear": 1.5}
    assert load_profile(str(profile.save(tmp_path / "mine.json"))) == profile
    linear, half = _work("opt-13b", unit="linear"), _work("opt-13b", unit="half")
    ops = {work.unit: figures(work, profile)[0] for work in (_work("opt-13b"), linear, half)}
    assert ops["linear"].compute_s == pytest.approx(ops["block"].compute_s / 3, rel=0.02)  # packed: about a third each
    assert linear.host_s(profile) == pytest.approx(1.5e-3 / 3)  # its share of the cut block's two probes
    assert replace(linear, directions=2).host_s(profile) == pytest.approx(0.5e-3 * (1.2 + 4 * 0.45) / (1.2 + 2 * 0.45))
    assert half.host_s(profile) == _work("opt-13b").host_s(profile) == pytest.approx(2.1e-3)  # unmeasured: a block's


@pytest.mark.parametrize("cut", [{"quarter": 1.0}, {"linear": -1.0}, {"linear": True}, {"half": float("inf")}, [1.0]])
def test_a_profile_with_a_bad_cut_block_time_is_refused_naming_it(cut: object) -> None:
    figures = {**asdict(BUILT_IN["h200"]), "host_cut_ms": cut}
    with pytest.raises(ValueError, match="profile 'h200': host_cut_ms takes half and linear units, each a time > 0"):
        GPUProfile(**figures)


def test_plan_says_when_a_finer_units_host_time_is_a_whole_blocks_and_uses_a_measured_cut(capsys, tmp_path) -> None:
    args = ["--model", "opt-1.3b", "--gpu-memory", "0.6GB"]
    assert plan_main(args) == 0
    out = capsys.readouterr().out
    assert "the host's time for a linear unit is a whole block's, an upper bound" in out
    upper = json.loads(out.strip().splitlines()[-1])
    measured = replace(BUILT_IN["h200"], name="cut", host_cut_ms={"linear": 1.5}).save(tmp_path / "cut.json")
    assert plan_main([*args, "--gpu", str(measured)]) == 0
    out = capsys.readouterr().out
    cut = json.loads(out.strip().splitlines()[-1])
    assert "a whole block's, an upper bound" not in out and "unit='linear'" in upper["policy"]
    assert cut["unit_s"]["the host"] == pytest.approx(1.5e-3 / 3) and cut["step_s"] < upper["step_s"]


def test_a_policy_given_that_does_not_fit_is_said_so_and_exits_1(capsys) -> None:
    """opt-1.3b at depth 1 needs 0.873 GB: within 0.5 GB the prediction is shown, with a line
    saying it would not fit, ``fits`` false and exit status 1; within 1 GB it fits."""
    assert plan_main(["--model", "opt-1.3b", "--policy", "depth=1", "--gpu-memory", "0.5GB"]) == 1
    out = capsys.readouterr().out
    assert "  needs 873.2 MB, more than the 500 MB planned within: it would run out of memory\n" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["policy_arg"] == "depth=1" and result["gpu_bytes"] == 873168896 and result["fits"] is False
    assert plan_main(["--model", "opt-1.3b", "--policy", "depth=1", "--gpu-memory", "1GB"]) == 0
    out = capsys.readouterr().out
    assert "planned within" not in out and json.loads(out.strip().splitlines()[-1])["fits"] is True


def test_nothing_fits_names_the_least_any_plan_needs(capsys) -> None:
    """Within 1 GB nothing fits opt-13b; the line says what the least needs and which policy that
    is: depth 0 with a unit per linear layer (depth 0 with whole blocks needs more)."""
    works = workloads(opt_config("opt-13b"), torch.float16, 1, 2048)
    least = predict_memory(works["linear"], Plan(0), BUILT_IN["h200"])
    assert least == min(predict_memory(work, Plan(0), BUILT_IN["h200"]) for work in works.values())
    assert predict_memory(works["block"], Plan(0), BUILT_IN["h200"]) > least
    assert plan_main(["--model", "opt-13b", "--gpu-memory", "1GB"]) == 1
    out = capsys.readouterr().out
    line = f"nothing fits in 1 GB: the least any plan needs is {show_size(least)} (--policy depth=0,unit=linear)"
    assert f"{line}\n" in out


def test_sizes_below_a_gigabyte_are_shown_in_megabytes(capsys) -> None:
    """Within 300 MB nothing fits opt-125m, whose least plan needs 301.7 MB: both sizes are shown
    to four figures, so the line does not read "nothing fits in 0.30 GB: ... needs 0.302 GB"."""
    works = workloads(opt_config("opt-125m"), torch.float16, 1, 2048)
    assert min(predict_memory(work, Plan(0), BUILT_IN["h200"]) for work in works.values()) == 301_698_240
    assert plan_main(["--model", "opt-125m", "--gpu-memory", "300MB"]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("; within 300 MB")
    assert "nothing fits in 300 MB: the least any plan needs is 301.7 MB (--policy depth=0,unit=linear)\n" in out
    assert plan_main(["--model", "opt-125m", "--gpu-memory", "1MB"]) == 1
    assert "nothing fits in 1 MB: the least" in capsys.readouterr().out
    assert [show_size(n) for n in (0, 999, 10**6, 1_234_567, 24 * 10**9, 350 * 10**9, 2 * 10**12)] == [
        "0 bytes", "999 bytes", "1 MB", "1.235 MB", "24 GB", "350 GB", "2 TB"
    ]  # fmt: skip


def test_the_memory_table_lines_up(capsys) -> None:
    """Each part's size ends in the same column, the longest part's name included."""
    assert plan_main(["--model", "opt-1.3b", "--policy", "depth=1", "--gpu-memory", "1GB"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.endswith(" GB") and line.startswith("  ")]
    assert len(rows) == 2 * 7 and rows[0].startswith("  kept on the device (embed_head; perturbed a chunk at a time) ")
    assert {len(row) for row in rows} == {len(rows[0])}


def test_plan_help_gives_every_options_default(capsys) -> None:
    with pytest.raises(SystemExit):
        plan_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "or a profile file (default h200)" in text and "(default opt-13b)" in text and "(default 2048)" in text
