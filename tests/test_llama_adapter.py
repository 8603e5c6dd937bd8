"""Beyond OPT: Llama, Mistral, Qwen2 and Qwen3 models through the same runtime, equal to HF's own
forward and to the reference bit for bit."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

import zoruntime
from zoruntime.models import adapter_for
from zoruntime.models.freeze import freeze
from zoruntime.models.llama import FURTHER_FAMILIES, LlamaLikeAdapter
from zoruntime.policies import FixedDepth, MemoryBudget
from zoruntime.zo.reference import ReferenceZO

SHAPE = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=48,
)  # fmt: skip  (grouped-query: 2 heads share a kv head)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}  # fmt: skip

CONFIGS = {
    "llama": lambda: LlamaConfig(**SHAPE),
    "llama3-rope-scaling-tied": lambda: LlamaConfig(**SHAPE, tie_word_embeddings=True, rope_scaling=LLAMA3_ROPE),
    "mistral-sliding-window": lambda: MistralConfig(**SHAPE, sliding_window=4),
    "qwen2-sliding-on-some-layers-tied": lambda: Qwen2Config(
        **SHAPE, use_sliding_window=True, sliding_window=4, max_window_layers=1, tie_word_embeddings=True
    ),
    "qwen3-qk-norms": lambda: Qwen3Config(**SHAPE, head_dim=8),
}

# Each further family with what sets it apart switched on; experts kept few and small.
_EXPERTS = dict(
    num_experts=4,
    num_local_experts=4,
    moe_num_experts=4,
    n_routed_experts=4,
    moe_intermediate_size=16,
    num_experts_per_tok=2,
    moe_k=2,
)
FURTHER_SETTINGS: dict[str, dict[str, object]] = {
    "apertus": {}, "arcee": {}, "ernie4_5": {"head_dim": 8}, "gemma": {"head_dim": 8},
    "exaone4": {"sliding_window": 4, "sliding_window_pattern": 2},  # sliding on alternate layers
    "glm": {"head_dim": 8, "partial_rotary_factor": 0.5}, "glm4": {"head_dim": 8, "partial_rotary_factor": 0.5},
    "helium": {"head_dim": 8}, "nemotron": {"partial_rotary_factor": 0.5}, "olmo": {"clip_qkv": 0.5},
    "olmo2": {}, "phi3": {"partial_rotary_factor": 0.5}, "seed_oss": {"head_dim": 8},
    "smollm3": {"no_rope_layer_interval": 2}, "starcoder2": {"sliding_window": 4},
    "stablelm": {"qk_layernorm": True, "use_parallel_residual": True, "partial_rotary_factor": 0.5},
    "ernie4_5_moe": _EXPERTS, "glm4_moe": {**_EXPERTS, "first_k_dense_replace": 1, "head_dim": 8},
    "gpt_oss": {**_EXPERTS, "sliding_window": 4, "head_dim": 8}, "jetmoe": _EXPERTS,
    "mixtral": {**_EXPERTS, "sliding_window": 4}, "olmoe": _EXPERTS,
    "qwen2_moe": {**_EXPERTS, "shared_expert_intermediate_size": 32}, "qwen3_moe": {**_EXPERTS, "head_dim": 8},
}  # fmt: skip
SPECIAL_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
for _family, _settings in FURTHER_SETTINGS.items():
    CONFIGS[_family] = lambda f=_family, s=_settings: AutoConfig.for_model(f, **SHAPE, **SPECIAL_IDS, **s)


def _model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """HF's random init, then every weight moved a little (norms off 1, biases off 0), so that a
    norm or bias the adapter ran wrongly would show."""
    torch.manual_seed(seed)  # HF's initialiser draws from the global RNG (the test's, not the package's)
    model = AutoModelForCausalLM.from_config(CONFIGS[name]())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.02)
    return model.to(dtype).eval()


def test_every_further_family_is_tested_with_its_own_settings() -> None:
    assert sorted(FURTHER_SETTINGS) == sorted(FURTHER_FAMILIES)


@pytest.mark.parametrize("model_type", ["granite", "cohere", "gemma2"])
def test_families_whose_forward_does_more_are_refused(model_type: str) -> None:
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **SHAPE, **SPECIAL_IDS))
    with pytest.raises(TypeError, match=rf"model_type '{model_type}'\); supported model types: .*llama"):
        adapter_for(model)


def _batch(seed: int = 0, rows: int = 3, length: int = 12) -> dict[str, torch.Tensor]:
    """Right padding in row 0, left padding in row 1; labels -100 where padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (rows, length), generator=g)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[0, length - 4 :] = 0
    mask[1, :3] = 0
    labels = ids.clone()
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.no_grad()
def test_stages_equal_hf_forward_bitwise(name: str) -> None:
    model = _model(name)
    adapter = adapter_for(model)
    assert isinstance(adapter, LlamaLikeAdapter)
    batch = _batch()
    hf = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    validated = adapter.validate(batch)
    inputs = adapter.prepare(validated, torch.device("cpu"), torch.float32)
    ends = dict(adapter.groups()[0][1])
    hidden = adapter.embed(ends, inputs)
    for i in range(adapter.num_blocks):
        hidden = adapter.block(i, dict(adapter.groups()[i + 1][1]), hidden, inputs)
    logits = adapter.head(ends, hidden)
    assert torch.equal(logits, hf.logits)
    assert torch.equal(adapter.causal_lm_loss(logits, validated), hf.loss)
    assert abs(float(adapter.head_loss(ends, hidden, validated)) - float(hf.loss)) < 1e-6  # summed in pieces


def test_the_families_have_what_they_claim() -> None:
    scaled = _model("llama3-rope-scaling-tied")
    assert adapter_for(scaled).tied and not adapter_for(_model("llama")).tied
    assert scaled.model.rotary_emb.rope_type == "llama3"
    qwen2 = adapter_for(_model("qwen2-sliding-on-some-layers-tied"))
    assert qwen2._layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert adapter_for(_model("mistral-sliding-window"))._layer_types == ["sliding_attention"] * 3
    qwen3 = dict(adapter_for(_model("qwen3-qk-norms")).groups()[1][1])
    assert "self_attn.q_norm.weight" in qwen3 and "self_attn.k_norm.weight" in qwen3
    decayed = {s.name for s in adapter_for(_model("qwen3-qk-norms")).block_layouts[0].slices if s.decayed}
    assert "mlp.gate_proj.weight" in decayed and not any("norm" in n for n in decayed)  # RMSNorms take no decay


@pytest.mark.asyncio
@pytest.mark.parametrize("name", sorted(CONFIGS))
async def test_the_runtime_equals_the_reference_bitwise(name: str) -> None:
    model, reference_model = _model(name), _model(name)
    config = zoruntime.ZOSGD(lr=1e-3, eps=1e-3, weight_decay=0.1, seed=3)
    reference = ReferenceZO(reference_model, config)
    block = adapter_for(model).block_layouts[0].nbytes
    policy = MemoryBudget(6 * block) if "qwen" in name else FixedDepth(1, offload_every=2)
    async with zoruntime.Runtime(model, config, policy=policy) as rt:
        for i in range(3):
            batch = _batch(seed=i)
            assert await rt.step(batch) == reference.step(batch)
        assert await rt.evaluate(_batch(seed=9)) == reference.evaluate(_batch(seed=9))
    for a, b in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.asyncio
async def test_bf16_llama_trains_with_stochastic_rounding_and_a_frozen_block() -> None:
    model, reference_model = _model("llama", dtype=torch.bfloat16), _model("llama", dtype=torch.bfloat16)
    for m in (model, reference_model):
        freeze(m, "blocks:1")
    config = zoruntime.ZOSGD(lr=1e-3, eps=1e-2)
    reference = ReferenceZO(reference_model, config)
    frozen_before = [p.detach().clone() for p in model.model.layers[1].parameters()]
    async with zoruntime.Runtime(model, config) as rt:
        for i in range(2):
            assert await rt.step(_batch(seed=i)) == reference.step(_batch(seed=i))
    assert all(torch.equal(a, b) for a, b in zip(model.model.layers[1].parameters(), frozen_before, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference_model.parameters(), strict=True))


def test_zoruntime_train_resume_and_replay_a_locally_saved_qwen3(tmp_path, capsys) -> None:
    """The command line loads any supported family from a folder (here a tiny Qwen3 with the
    byte tokenizer, saved by the test) and trains it; a run stopped after 2 steps and resumed ends
    where the uninterrupted one does, and replay rebuilds the same weights."""
    from safetensors.torch import load_file

    from zoruntime.data.tokenizer import ByteTokenizer
    from zoruntime.replay import main as replay_main
    from zoruntime.train import main as train_main

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen3Config(**{**SHAPE, "vocab_size": 260}, head_dim=8))
    model.save_pretrained(tmp_path / "base")
    ByteTokenizer().save_pretrained(tmp_path / "base")
    out = tmp_path / "run"
    args = ["--no-progress", "--eval-every", "0", "--no-trace", "--max-length", "16", "--batch-size", "2",
            "--steps", "3", "--model", str(tmp_path / "base"), "--out", str(out)]  # fmt: skip
    assert train_main(args) == 0, capsys.readouterr().err
    stopped = tmp_path / "stopped"
    assert train_main([*args[:-1], str(stopped), "--steps", "2", "--checkpoint-every", "1"]) == 0
    assert train_main(["--no-progress", "--resume", str(stopped), "--steps", "3"]) == 0, capsys.readouterr().err
    assert replay_main(["--run", str(out), "--out", str(tmp_path / "replayed")]) == 0
    trained, replayed, resumed = (
        load_file(out / "model" / "model.safetensors"),
        load_file(tmp_path / "replayed" / "model.safetensors"),
        load_file(stopped / "model" / "model.safetensors"),
    )
    base = load_file(tmp_path / "base" / "model.safetensors")
    assert trained.keys() == replayed.keys() and all(torch.equal(trained[k], replayed[k]) for k in trained)
    assert trained.keys() == resumed.keys() and all(torch.equal(trained[k], resumed[k]) for k in trained)
    assert any(not torch.equal(trained[k], base[k]) for k in trained)


def _family_tokenizer(kind: str, folder) -> object:
    """The family's own tokenizer pipeline (``LlamaTokenizer``: SentencePiece-style BPE with byte
    fallback; ``Qwen2Tokenizer``: byte-level BPE), trained here on the generated corpus and saved
    in ``folder``: nothing is downloaded."""
    import string

    from transformers import LlamaTokenizer, Qwen2Tokenizer

    from zoruntime.data.corpus import generated_corpus

    text = generated_corpus(0)[0][:200_000] + string.printable
    untrained = {"llama": LlamaTokenizer, "qwen2": Qwen2Tokenizer}[kind]()
    tokenizer = untrained.train_new_from_iterator([text[i : i + 1000] for i in range(0, len(text), 1000)], 400)
    tokenizer.save_pretrained(folder)
    return tokenizer


@pytest.mark.parametrize(("family", "tokenizer_kind"), [("llama", "llama"), ("qwen3-qk-norms", "qwen2")])
def test_lm_and_sst2_tasks_with_the_familys_own_tokenizer(family: str, tokenizer_kind: str, tmp_path,
                                                          monkeypatch, capsys) -> None:  # fmt: skip
    """``zoruntime train --model FOLDER`` with the tokenizer saved beside the model: the LM task and
    SST-2's candidate scoring (its examples given here: the GLUE download needs a network) both run,
    and the run saves the family's tokenizer with the trained model."""
    import json

    from transformers import AutoTokenizer

    from zoruntime.train import data as train_data
    from zoruntime.train import main as train_main

    tokenizer = _family_tokenizer(tokenizer_kind, tmp_path / "base")
    torch.manual_seed(0)
    config = CONFIGS[family]()
    config.vocab_size, config.max_position_embeddings = len(tokenizer), 64
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    examples = [("a gripping, funny film", 1), ("dull and far too long", 0), ("I loved it", 1), ("awful", 0)]
    monkeypatch.setattr(train_data, "load_sst2", lambda **_: (examples, examples[:2]))
    for task in ("lm", "sst2"):
        out = tmp_path / task
        args = ["--no-progress", "--no-trace", "--task", task, "--max-length", "32", "--batch-size", "2",
                "--steps", "2", "--eval-every", "0", "--model", str(tmp_path / "base"), "--out", str(out)]  # fmt: skip
        assert train_main(args) == 0, capsys.readouterr().err
        summary = json.loads((out / "summary.json").read_text())
        assert summary["dev_loss_after"] > 0
        assert (summary.get("accuracy_after") is not None) == (task == "sst2")
        saved = AutoTokenizer.from_pretrained(out / "model")
        assert type(saved) is type(tokenizer) and saved.encode("It was great.") == tokenizer.encode("It was great.")
    assert tokenizer.decode(tokenizer.encode("The film was great. It was", add_special_tokens=False)).strip() == (
        "The film was great. It was"
    )


# the parameter counts the model cards publish, in billions
PUBLISHED_BILLIONS = {"llama-2-7b": 6.74, "llama-2-13b": 13.0, "llama-2-70b": 69.0, "llama-3.1-8b": 8.03,
                      "llama-3.1-70b": 70.6, "mistral-7b": 7.24, "qwen2.5-7b": 7.62, "qwen2.5-72b": 72.7,
                      "qwen3-8b": 8.19, "qwen3-32b": 32.8}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_named_shapes_have_the_published_parameter_counts_and_stream(name: str) -> None:
    """Built on the meta device from the shapes by name: as many parameters as the model card
    says (within 0.5%), one unit per decoder layer, and a plan the planner can predict."""
    from zoruntime.models.init import meta_model
    from zoruntime.models.shapes import named_config
    from zoruntime.storage import model_layout

    config = named_config(name)
    model = meta_model(config, torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(PUBLISHED_BILLIONS[name], rel=5e-3)
    assert model_layout(adapter_for(model), torch.bfloat16).num_units == config.num_hidden_layers


def test_zoruntime_plan_knows_llama_like_shapes_by_name(capsys) -> None:
    import json

    from zoruntime.plan import main as plan_main

    assert plan_main(["--model", "qwen3-8b", "--policy", "depth=1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["model"] == "qwen3-8b" and result["ratio_to_floor"] > 0.85
    assert plan_main(["--model", "llama-5"]) == 2
    assert "unknown model shape 'llama-5'; known: opt-125m" in capsys.readouterr().err
