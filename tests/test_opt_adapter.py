"""The OPT adapter's three stages reproduce HF's forward bit for bit; groups cover every parameter once."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, token_batch

from zoruntime.models import OPTAdapter, adopt_into_flat


def _stages(adapter: OPTAdapter, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    validated = adapter.validate(batch)
    inputs = adapter.prepare(validated, torch.device("cpu"), torch.float32)
    resident = adapter.embed_head_parameters()
    hidden = adapter.embed(resident, inputs)
    for i in range(adapter.num_blocks):
        hidden = adapter.block(i, adapter.block_parameters(i), hidden, inputs)
    logits = adapter.head(resident, hidden)
    return logits, adapter.causal_lm_loss(logits, validated)


@pytest.mark.parametrize("padding", ["none", "right_and_left"])
def test_stages_equal_hf_forward_bitwise(variant: str, padding: str) -> None:
    model = tiny_model(variant, seed=3)
    batch = token_batch(model.config, seed=4)
    if padding == "none":
        batch = {"input_ids": batch["input_ids"], "labels": batch["input_ids"].clone()}
        batch["labels"][2, :5] = -100
    hf = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"])
    logits, loss = _stages(OPTAdapter(model), batch)
    assert torch.equal(logits, hf.logits)
    assert torch.equal(loss, hf.loss)


def test_variants_have_the_structure_they_claim() -> None:
    post = OPTAdapter(tiny_model("post_ln_proj"))
    assert post.model.model.decoder.project_in is not None
    assert post.model.model.decoder.final_layer_norm is None
    assert OPTAdapter(tiny_model("pre_ln_tied")).tied
    assert not OPTAdapter(tiny_model("pre_ln_untied")).tied


def test_every_parameter_in_exactly_one_group(variant: str) -> None:
    model = tiny_model(variant)
    adapter = OPTAdapter(model)
    grouped = list(adapter.embed_head_parameters().values())
    for i in range(adapter.num_blocks):
        grouped += list(adapter.block_parameters(i).values())
    assert len({id(p) for p in grouped}) == len(grouped)
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters()}
    assert adapter.embed_head_layout.numel + sum(lay.numel for lay in adapter.block_layouts) == sum(
        p.numel() for p in model.parameters()
    )


def test_tied_head_is_one_parameter_in_the_resident_group() -> None:
    adapter = OPTAdapter(tiny_model("pre_ln_tied"))
    names = [s.name for s in adapter.embed_head_layout.slices]
    assert "embed_tokens.weight" in names and "lm_head.weight" not in names
    untied = OPTAdapter(tiny_model("pre_ln_untied"))
    assert "lm_head.weight" in [s.name for s in untied.embed_head_layout.slices]


def test_flat_layout_makes_parameters_views_and_keeps_the_forward() -> None:
    model = tiny_model("pre_ln_tied", seed=5)
    batch = token_batch(model.config)
    before = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    adapter = OPTAdapter(model)
    flat = torch.empty(adapter.block_layouts[0].numel)
    adopt_into_flat(adapter.block_layouts[0], adapter.block_parameters(0), flat)
    resident = torch.empty(adapter.embed_head_layout.numel)
    adopt_into_flat(adapter.embed_head_layout, adapter.embed_head_parameters(), resident)
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    assert model.lm_head.weight.data_ptr() == resident.data_ptr()
    for p in adapter.block_parameters(0).values():
        assert flat.data_ptr() <= p.data_ptr() < flat.data_ptr() + flat.numel() * flat.element_size()
    after = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(before, after)


def test_weight_decay_flags_skip_biases_and_layer_norms() -> None:
    adapter = OPTAdapter(tiny_model("pre_ln_tied"))
    block = {s.name: s.decayed for s in adapter.block_layouts[0].slices}
    assert block["fc1.weight"] and block["self_attn.q_proj.weight"]
    assert not block["fc1.bias"] and not block["self_attn_layer_norm.weight"]
    assert not block["final_layer_norm.weight"] and not block["final_layer_norm.bias"]
    resident = {s.name: s.decayed for s in adapter.embed_head_layout.slices}
    assert resident["embed_tokens.weight"] and not resident["final_layer_norm.weight"]


def test_the_loss_in_pieces_equals_hfs_loss(variant: str, monkeypatch) -> None:
    """Eight rows of 40 tokens (a piece of 256 and a shorter one), padding on both sides and
    labels of -100: within float rounding of ``model(...).loss``, never holding every logit."""
    from zoruntime.models.vocab import loss_piece_tokens
    from zoruntime.planning import memory

    model = tiny_model(variant)
    monkeypatch.setattr(memory, "LOSS_PIECE_ELEMENTS", 256 * model.config.vocab_size)  # one chunk: the vocabulary
    adapter = OPTAdapter(model)
    batch = token_batch(model.config, rows=8, length=40)
    assert loss_piece_tokens(model.config.vocab_size) == 256
    with torch.no_grad():
        expected = model(**batch).loss
        inputs = adapter.prepare(adapter.validate(batch), torch.device("cpu"), torch.float32)
        hidden = adapter.embed(adapter.embed_head_parameters(), inputs)
        for i in range(adapter.num_blocks):
            hidden = adapter.block(i, adapter.block_parameters(i), hidden, inputs)
        loss = adapter.head_loss(adapter.embed_head_parameters(), hidden, inputs.batch)
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0), (loss, expected)


def test_a_bound_layer_runs_the_tensors_it_was_bound_to_as_they_are_now() -> None:
    """``bound_layer`` on the step's ``layer_inputs`` runs bitwise what ``block`` runs on the same
    tensors, follows their values when they change in place, shares no weights with the model,
    and refuses incomplete params."""
    model = tiny_model(seed=5)
    adapter = OPTAdapter(model)
    inputs = adapter.prepare(adapter.validate(token_batch(model.config, seed=6)), torch.device("cpu"), torch.float32)
    hidden = adapter.embed(adapter.embed_head_parameters(), inputs)
    params = {name: p.detach().clone() for name, p in adapter.block_parameters(1).items()}
    layer = adapter.bound_layer(1, params)
    run = lambda hidden, inputs: layer(hidden, adapter.layer_inputs(1, inputs))  # noqa: E731
    assert torch.equal(run(hidden, inputs), adapter.block(1, params, hidden, inputs))
    for tensor in params.values():
        tensor.mul_(1.5)
    assert torch.equal(run(hidden, inputs), adapter.block(1, params, hidden, inputs))
    assert not torch.equal(run(hidden, inputs), adapter.block(1, adapter.block_parameters(1), hidden, inputs))
    with pytest.raises(ValueError, match="lack some of the block's parameters"):
        adapter.bound_layer(0, dict(list(params.items())[1:]))
