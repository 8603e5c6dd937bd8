"""The throughput benchmark runs end to end (CPU smoke run) and ends with one JSON document."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from zoruntime.bench import rounding, throughput
from zoruntime.models import OPTAdapter, adapter_for
from zoruntime.models.init import TINY_CONFIGS, materialize_flat, meta_model, tiny_opt_config
from zoruntime.models.shapes import OPT_NAMES, opt_config, shape_dims
from zoruntime.planning.memory import loss_pieces
from zoruntime.planning.planner import Workload, forward_flops
from zoruntime.planning.profiles import load_profile
from zoruntime.storage import model_layout
from zoruntime.train.model import available_bytes


def test_bench_smoke_run_on_cpu_prints_a_table_and_a_json_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "zoruntime", "bench", "--device", "cpu", "--model", "tiny", "--seq", "32",
         "--steps", "1", "--directions", "2"],
        capture_output=True, text=True, timeout=100, check=True,
    )  # fmt: skip
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["model"] == "tiny" and result["card"]["bound_by"] in {"upload", "offload", "compute"}
    card = result["card"]  # on a CPU the copies take microseconds and their times are noise: only their shape
    assert all(card[k] > 0 for k in ("both_directions_ms", "upload_ms", "offload_ms"))
    assert card["duplex_floor_tokens_s"] <= card["floor_tokens_s"]
    assert card["blas_workspace_mib"] == 0  # cuBLAS's: a GPU's alone
    assert card["compute_rest_ms"] > 0  # the task without its forwards, timed on its own
    assert card["host_task_ms"] >= 0 and card["host_probe_ms"] >= 0  # the host's time split as profiles take it
    assert set(card["host_parts_ms"]) == {"update", "draw", "perturb", "forward", "upload"}
    assert all(ms > 0 for ms in card["host_parts_ms"].values())
    assert card["host_task_ms"] + 2 * card["host_probe_ms"] == pytest.approx(card["compute_enqueue_ms"])
    tiny, tokens = tiny_opt_config(), result["batch"] * result["seq"]
    pieces = loss_pieces(tiny.vocab_size, tiny.word_embed_proj_dim, tokens)  # the head's loss: issued per piece
    assert card["head_ms"] > 0 and card["host_piece_ms"] * pieces == pytest.approx(card["head_enqueue_ms"])
    assert "ratios below are to the upload-only floor" in done.stdout
    runners = [row["runner"] for row in result["rows"]]
    assert runners[:5] == ["MeZO (after the paper)", "zoruntime, all resident", "FixedDepth(0)", "FixedDepth(1)",
                           "FixedDepth(2)"]  # fmt: skip
    assert runners[5].startswith("MemoryBudget(") and runners[6:] == ["FixedDepth(1), q=2 two-sided"]
    assert [row.get("directions") for row in result["rows"]] == [None, 1, 1, 1, 1, 1, 2]  # MeZO's row: its own code
    assert all(row["tokens_s"] > 0 for row in result["rows"])
    assert any(line.startswith("runner") for line in lines)


def test_bench_on_cpu_defaults_to_the_tiny_model_says_copy_and_sizes_the_budget_in_mb() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "zoruntime", "bench", "--device", "cpu", "--steps", "1", "--skip-mezo"],
        capture_output=True, text=True, timeout=100, check=True,
    )  # fmt: skip
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert (result["model"], result["seq"], result["batch"]) == ("tiny", 128, 1)
    assert lines[0].startswith("zoruntime bench: tiny fp16, batch 1 x 128, on CPU")
    card_line = next(line for line in lines if " blocks of " in line)
    assert re.fullmatch(
        r"  2 blocks of 0\.10 MB; copy to the compute buffer \d+\.\d\d ms \(\d+\.\d GB/s\), "
        r"copy back \d+\.\d\d ms \(\d+\.\d GB/s\)",
        card_line,
    ), card_line
    assert "pinned" not in done.stdout
    budget = result["rows"][-1]["runner"]
    assert re.fullmatch(r"MemoryBudget\(0\.\d\d MB\)", budget) and budget != "MemoryBudget(0.00 MB)", budget


def test_bench_help_states_the_defaults_per_device(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        throughput.main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "qwen3-32b, tiny, tiny-llama (default: opt-1.3b on cuda, tiny on cpu)" in text
    assert "tokens per sequence (default: 2048 on cuda, 128 on cpu)" in text


def test_bench_refuses_a_device_it_cannot_run_on(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        throughput.main(["--device", "mps"])
    assert done.value.code == 2
    assert capsys.readouterr().err.strip().endswith("error: --device 'mps' is not supported; use cuda or cpu")
    with pytest.raises(SystemExit) as done:
        throughput.main(["--device", "cpu", "--directions", "2", "--estimator", "one-sided"])
    assert done.value.code == 2
    assert capsys.readouterr().err.strip().endswith("error: --directions takes numbers >= 3 with --estimator one-sided")
    with pytest.raises(SystemExit) as done:
        throughput.main(["--device", "cpu", "--cuda-graphs"])
    assert done.value.code == 2
    assert capsys.readouterr().err.strip().endswith("error: --cuda-graphs replays CUDA graphs: it needs --device cuda")
    if (available_bytes("cpu") or 0) < 300e9:  # opt-175b's 349 GB of fp16 weights: one line, not an allocation
        with pytest.raises(SystemExit) as done:
            throughput.main(["--device", "cpu", "--model", "opt-175b"])
        assert done.value.code == 2
        expected = (
            r"error: --model opt-175b's weights take 349\.2 GB of host memory and [\d.]+ GB is free; "
            r"--alias shares one block's buffer among all \(4\.9 GB\)$"
        )
        assert re.search(expected, capsys.readouterr().err)
    for size in ("-1", "0", "inf"):  # -1 and inf were tracebacks; 0 was taken as "not given"
        with pytest.raises(SystemExit) as done:
            throughput.main(["--device", "cpu", "--budget-gb", size])
        assert done.value.code == 2
        assert capsys.readouterr().err.strip().endswith(f"error: --budget-gb must be a size > 0 (the MemoryBudget "
                                                        f"row's, in GiB), got {float(size)}")  # fmt: skip
    for sizes in (["1.2", "inf"], ["nan"]):  # tracebacks converting to bytes
        with pytest.raises(SystemExit) as done:
            throughput.main(["--device", "cpu", "--planned", *sizes])
        assert done.value.code == 2
        expected = f"error: --planned takes sizes > 0 in GB, got {' '.join(sizes)}"
        assert capsys.readouterr().err.strip().endswith(expected)


def test_bench_names_the_budget_and_the_link_for_the_device() -> None:
    assert throughput.budget_name(39 * 2**30) == "MemoryBudget(39.00 GB)"
    assert throughput.budget_name(2**30) == "MemoryBudget(1.00 GB)"
    assert throughput.budget_name(3 * 2**28) == "MemoryBudget(768.00 MB)"
    assert throughput.budget_name(600 * 2**10) == "MemoryBudget(0.59 MB)"
    facts = {"upload_ms": 11.5, "upload_gb_s": 54.7, "offload_ms": 12.0, "offload_gb_s": 52.4}
    assert throughput.link_line(True, facts) == "upload (pinned) 11.50 ms (54.7 GB/s), offload 12.00 ms (52.4 GB/s)"
    assert throughput.link_line(False, facts) == (
        "copy to the compute buffer 11.50 ms (54.7 GB/s), copy back 12.00 ms (52.4 GB/s)"
    )


def test_bench_refuses_bad_options() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "zoruntime", "bench", "--device", "cpu", "--model", "tiny", "--seq", "0"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and "must be positive" in done.stderr


@pytest.mark.parametrize("name", OPT_NAMES)
def test_opt_shapes_have_the_released_parameter_counts(name: str) -> None:
    released = {"opt-125m": 0.125, "opt-350m": 0.331, "opt-1.3b": 1.316, "opt-2.7b": 2.652, "opt-6.7b": 6.658,
                "opt-13b": 12.853, "opt-30b": 29.975, "opt-66b": 65.72, "opt-175b": 174.6}  # fmt: skip
    with torch.device("meta"):
        model = __import__("transformers").OPTForCausalLM(opt_config(name))
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(released[name], rel=2e-3)


def test_materialized_model_is_flat_tied_and_aliases_blocks_on_request() -> None:
    model = materialize_flat(
        tiny_opt_config(num_hidden_layers=3), lambda n, d: torch.empty(n, dtype=d), alias_blocks=True
    )
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    layers = model.model.decoder.layers
    assert layers[0].fc1.weight.data_ptr() == layers[2].fc1.weight.data_ptr()
    adapter = OPTAdapter(model)
    first = layers[0]
    assert float(first.self_attn_layer_norm.weight.detach().min()) == 1.0
    assert float(first.fc1.bias.detach().abs().max()) == 0.0 and 0.015 < float(first.fc1.weight.detach().std()) < 0.025
    assert all(p.requires_grad for p in model.parameters())  # trainable, as HF makes a model
    assert adapter.num_blocks == 3


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
@torch.no_grad()
def test_a_materialized_model_of_any_family_runs_as_hf_builds_it(family: str) -> None:
    """Born flat (rotary frequencies rebuilt from the config), the model computes what the same
    weights compute in a model HF builds; a copy made on a device equals it too."""
    from transformers import AutoModelForCausalLM

    from zoruntime.models.init import copy_to

    config = TINY_CONFIGS[family](num_hidden_layers=2)
    flat = materialize_flat(config, lambda n, d: torch.empty(n, dtype=d), dtype=torch.float32)
    built = AutoModelForCausalLM.from_config(config).eval()
    built.load_state_dict(flat.state_dict())
    ids = torch.randint(4, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(flat(ids).logits, built(ids).logits)
    assert torch.equal(copy_to(flat, "cpu")(ids).logits, built(ids).logits)
    assert len(adapter_for(flat).groups()) == 3


def test_bench_takes_llama_family_shapes_by_name(capsys) -> None:
    assert throughput.main(["--device", "cpu", "--model", "tiny-llama", "--seq", "16", "--steps", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model"] == "tiny-llama" and all(row["tokens_s"] > 0 for row in result["rows"])
    with pytest.raises(SystemExit):
        throughput.main(["--device", "cpu", "--model", "llama-5"])
    assert "unknown model shape 'llama-5'; known: opt-125m" in capsys.readouterr().err


def test_bench_streams_the_units_it_is_told_and_takes_policies_as_train_does(capsys, tmp_path) -> None:
    args = ["--device", "cpu", "--seq", "16", "--steps", "1", "--skip-mezo", "--alias", "--unit", "linear"]
    saved = ["--save-profile", str(tmp_path / "cpu.json")]
    assert throughput.main([*args, "--policy", "depth=1,offload=2,unit=linear", "fit=1GB", *saved]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    config, card = TINY_CONFIGS["tiny"](max_position_embeddings=16), result["card"]  # the profile: from whole blocks
    blocks = Workload(model_layout(adapter_for(meta_model(config, torch.float16)), torch.float16), shape_dims(config),
                      1, 16, "block", config.num_hidden_layers)  # fmt: skip
    profile = load_profile(str(tmp_path / "cpu.json"))
    assert profile.tflops == pytest.approx(2 * forward_flops(blocks) / card["dual_forward_ms"] * 1e3 / 1e12)
    assert profile.host_cut_ms == {"linear": card["unit_tasks_enqueue_ms"]}
    runners = [row["runner"] for row in result["rows"]]
    assert runners[:3] == [
        "FixedDepth(0, unit='linear')",
        "FixedDepth(1, unit='linear')",
        "FixedDepth(2, unit='linear')",
    ]
    assert runners[-2] == "depth=1,offload=2,unit=linear" and all(row["tokens_s"] > 0 for row in result["rows"])
    assert runners[-1].startswith("planned, 1 GB: ")  # fit=SIZE runs as --planned GB
    with pytest.raises(SystemExit):
        throughput.main([*args, "--policy", "depth=1"])
    assert "--policy depth=1: its unit differs from --unit linear" in capsys.readouterr().err


def test_aliased_units_share_one_buffer_per_place_in_the_block() -> None:
    model = materialize_flat(tiny_opt_config(num_hidden_layers=3), lambda n, d: torch.empty(n, dtype=d),
                             alias_blocks=True, unit="linear")  # fmt: skip
    layers = model.model.decoder.layers
    assert layers[0].fc1.weight.data_ptr() == layers[2].fc1.weight.data_ptr() != layers[0].fc2.weight.data_ptr()
    assert len(adapter_for(model, "linear").groups()) == 1 + 3 * 4  # q, k, v packed; out; fc1; fc2


def test_filling_on_a_device_draws_the_same_weights_as_filling_in_place() -> None:
    # The benchmark fills big models on the GPU (a CPU draws normals at a few hundred MB/s);
    # with the device being the CPU the two paths must agree bit for bit.
    config = tiny_opt_config(num_hidden_layers=2)
    direct = materialize_flat(config, lambda n, d: torch.empty(n, dtype=d), seed=5)
    staged = materialize_flat(config, lambda n, d: torch.empty(n, dtype=d), seed=5, fill_device="cpu")
    for (name, a), (_, b) in zip(direct.named_parameters(), staged.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_on_a_gpu_the_update_is_one_kernel_and_the_head_a_quarter_of_the_pieces() -> None:
    """Operations the host issues at opt-1.3b's shape (``bench.overhead``), the kernel paths
    counted as they would run on a GPU with Triton (a kernel one launch)."""
    from zoruntime.bench import overhead

    ops = overhead.dispatched_per_task()
    for row in ops["units"].values():  # z drawn a chunk at a time, then one kernel for the group
        assert row["update_ops_gpu"] < row["update_ops"] / 10
        # a 16-bit perturbed copy is one add on a GPU, a multiply and an add a span on a CPU
        assert row["probe_ops_gpu"] < row["probe_ops"] / 2
    assert ops["head_ops_gpu"] < ops["head_ops"] / 4  # 14 pieces a probe instead of 56


def test_the_rounding_table_lines_up_and_needs_two_steps(capsys) -> None:
    """fp32's rounding, "nearest (float32)", overflowed its 12-character column; with --steps 1
    no step had applied an update to count, and the mean of none raised StatisticsError."""
    assert rounding.main(["--steps", "2", "--seeds", "0"]) == 0
    table = capsys.readouterr().out.splitlines()[1:7]
    assert [line.split()[0] for line in table] == ["masters", "fp32", "fp16", "fp16", "bf16", "bf16"]
    assert table[1].startswith("fp32    nearest (float32)  ") and {len(line) for line in table} == {len(table[0])}
    with pytest.raises(SystemExit):
        rounding.main(["--steps", "1"])
    assert capsys.readouterr().err.endswith(
        "error: --steps must be at least 2: a step's update is applied, and counted, during the next step\n"
    )
