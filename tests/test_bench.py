"""The throughput benchmark runs end to end (CPU smoke run) and ends with one JSON document."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from zoruntime.models import OPTAdapter
from zoruntime.models.init import materialize_flat, tiny_opt_config
from zoruntime.models.shapes import OPT_NAMES, opt_config


def test_bench_smoke_run_on_cpu_prints_a_table_and_a_json_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "zoruntime", "bench", "--device", "cpu", "--model", "tiny", "--seq", "32",
         "--steps", "1"],
        capture_output=True, text=True, timeout=100, check=True,
    )  # fmt: skip
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["model"] == "tiny" and result["card"]["bound_by"] in {"upload", "offload", "compute"}
    runners = [row["runner"] for row in result["rows"]]
    assert runners[:4] == ["MeZO (all resident)", "FixedDepth(0)", "FixedDepth(1)", "FixedDepth(2)"]
    assert runners[4].startswith("MemoryBudget(")
    assert all(row["tokens_s"] > 0 for row in result["rows"])
    assert any(line.startswith("runner") for line in lines)


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
    assert float(layers[0].self_attn_layer_norm.weight.min()) == 1.0 and float(layers[0].fc1.bias.abs().max()) == 0.0
    assert 0.015 < float(layers[0].fc1.weight.std()) < 0.025
    assert adapter.num_blocks == 3


def test_filling_on_a_device_draws_the_same_weights_as_filling_in_place() -> None:
    # The benchmark fills big models on the GPU (a CPU draws normals at a few hundred MB/s);
    # with the device being the CPU the two paths must agree bit for bit.
    config = tiny_opt_config(num_hidden_layers=2)
    direct = materialize_flat(config, lambda n, d: torch.empty(n, dtype=d), seed=5)
    staged = materialize_flat(config, lambda n, d: torch.empty(n, dtype=d), seed=5, fill_device="cpu")
    for (name, a), (_, b) in zip(direct.named_parameters(), staged.named_parameters(), strict=True):
        assert torch.equal(a, b), name
