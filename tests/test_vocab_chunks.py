"""The embedding and the head a chunk of the vocabulary at a time: the kept group is never copied
whole (nor its direction drawn whole), and the runtime still equals the reference bitwise.

Chunks are made small here (a few rows, spans of a few hundred elements) so that tiny models
cross many chunk boundaries: in the middle of the vocabulary, at the last short chunk, and
inside parameters that are not vocabulary-sized."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, tiny_model, token_batch

import zoruntime
from zoruntime.data.sst2 import candidate_accuracy, candidate_loss
from zoruntime.models import adapter_for
from zoruntime.models import vocab as vocab_module
from zoruntime.models.groups import adopt_into_flat
from zoruntime.models.vocab import TokenLookup, chunks, gather_rows
from zoruntime.planning import memory
from zoruntime.policies import FixedDepth, MemoryBudget
from zoruntime.zo.directions import CHUNK_ELEMENTS, DirectionSampler
from zoruntime.zo.reference import ReferenceZO
from zoruntime.zo.update import PendingUpdate, Rounding, apply_update, draw_direction, update_group


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "VOCAB_CHUNK_ELEMENTS", 300)  # 9 rows of 32: 8 chunks of a 64-word vocabulary
    monkeypatch.setattr(memory, "KEPT_SPAN_ELEMENTS", 512)
    monkeypatch.setattr(memory, "LOSS_PIECE_ELEMENTS", 100)  # the loss 11 tokens at a time


def test_the_kept_span_is_one_chunk_of_the_direction_scheme() -> None:
    assert memory.KEPT_SPAN_ELEMENTS == CHUNK_ELEMENTS


@pytest.mark.usefixtures("small_chunks")
def test_chunks_cover_the_vocabulary_in_whole_rows() -> None:
    assert chunks(64, 32) == [(0, 9), (9, 18), (18, 27), (27, 36), (36, 45), (45, 54), (54, 63), (63, 64)]
    assert chunks(5, 1000) == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]  # a row wider than a chunk is a chunk


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_the_loss_over_chunks_equals_hfs_and_the_logits_are_the_full_ones(family: str) -> None:
    model = tiny_model(family, num_hidden_layers=2)
    adapter = adapter_for(model)
    batch = adapter.validate(token_batch(model.config))
    out = model(batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels, output_hidden_states=True)
    head = dict(adapter.groups()[0][1])
    assert abs(float(adapter.head_loss(head, out.hidden_states[-1], batch, final=True)) - float(out.loss)) < 1e-6
    torch.testing.assert_close(adapter.head(head, out.hidden_states[-1], final=True), out.logits)


@pytest.mark.usefixtures("small_chunks")
@torch.no_grad()
def test_gathered_rows_equal_the_rows_of_the_whole_table() -> None:
    table = torch.randn(64, 32)
    ids = torch.tensor([[5, 63, 5, 0], [20, 21, 62, 9]])
    lookup = TokenLookup.of(ids, 64, 32)
    assert [(a, b) for a, b, _, _ in lookup.spans] == [(0, 9), (9, 18), (18, 27), (54, 63), (63, 64)]
    rows = gather_rows(vocab_module.TensorRows(table), lookup)
    assert torch.equal(rows[lookup.local_ids], table[ids])


@pytest.mark.usefixtures("small_chunks")
@torch.no_grad()
def test_opts_embedding_from_the_rows_of_one_token_equals_the_whole_tables() -> None:
    """One distinct token makes a table of one row, fewer than OPT's padding index (1): the
    embedding still runs (padding only matters to gradients) and equals the whole table's."""
    model = tiny_model(num_hidden_layers=1)
    layout, table = adapter_for(model).layout, model.model.decoder.embed_tokens.weight
    ids = torch.full((2, 3), 7)
    from_rows = layout.embed_tokens(
        {"embed_tokens.weight": vocab_module.TensorRows(table)}, ids, TokenLookup.of(ids, *table.shape)
    )
    assert torch.equal(from_rows, model.model.decoder.embed_tokens(ids))


def _layout_and_weights(dtype: torch.dtype):
    model = tiny_model("pre_ln_untied", dtype=dtype, num_hidden_layers=1)
    model.model.decoder.final_layer_norm.weight.requires_grad_(False)  # a frozen run inside the group
    layout, params = adapter_for(model).groups()[0]
    return layout, adopt_into_flat(layout, params, torch.empty(layout.numel, dtype=dtype))


@pytest.mark.parametrize(
    ("dtype", "rounding"), [(torch.float32, Rounding.NEAREST), (torch.bfloat16, Rounding.STOCHASTIC)]
)
def test_an_update_drawn_a_span_at_a_time_equals_the_whole_update(dtype: torch.dtype, rounding: Rounding) -> None:
    layout, weights = _layout_and_weights(dtype)
    sampler = DirectionSampler("cpu", chunk_elements=700)  # direction chunks that the spans cut through
    update = PendingUpdate.from_gradient(3, 1234, 1e-2, 0.1, torch.tensor(2.5), rounding)
    whole = weights.clone()
    apply_update(whole, draw_direction(sampler, 1234, layout, torch.empty_like(whole)), update, layout, sampler)
    spans = weights.clone()
    update_group(spans, update, layout, sampler, torch.empty(512, dtype=dtype))
    assert torch.equal(spans, whole) and not torch.equal(spans, weights)


@pytest.mark.asyncio
@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("variant", [*FAMILIES, "pre_ln_untied"])
async def test_the_runtime_with_chunked_ends_equals_the_reference_bitwise(variant: str) -> None:
    model, reference_model = tiny_model(variant, num_hidden_layers=3), tiny_model(variant, num_hidden_layers=3)
    config = zoruntime.ZOSGD(lr=1e-2, eps=1e-3, weight_decay=0.1, seed=3)
    reference = ReferenceZO(reference_model, config)
    async with zoruntime.Runtime(model, config, policy=FixedDepth(1)) as rt:
        kept, adapter = rt._work.storage.kept[0], adapter_for(model)
        vocab = [p for p in adapter.groups()[0][0].slices if p.name in adapter.vocab_names]
        assert kept.rest.numel() == adapter.groups()[0][0].numel - sum(p.numel for p in vocab)  # the rest, whole
        assert [r.numel() for r in kept.rows.values()] == [9 * 32] * len(vocab)  # one chunk of each vocabulary table
        for i in range(3):
            batch = token_batch(model.config, seed=i)
            assert await rt.step(batch) == reference.step(batch)
        batch = token_batch(model.config, seed=7)
        assert await rt.evaluate(batch) == reference.evaluate(batch)
    for (name, a), b in zip(reference_model.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.asyncio
@pytest.mark.usefixtures("small_chunks")
async def test_a_users_loss_on_chunked_logits_and_16_bit_compute_over_fp32_masters_equal_the_reference() -> None:
    from zoruntime.data.sst2 import candidate_batch
    from zoruntime.data.tokenizer import ByteTokenizer

    raw = candidate_batch([("fine", 1), ("awful", 0)], ByteTokenizer(), max_length=24)
    model = tiny_model(vocab_size=260, max_position_embeddings=64, num_hidden_layers=2)
    twin = tiny_model(vocab_size=260, max_position_embeddings=64, num_hidden_layers=2)
    config = zoruntime.ZOSGD(lr=1e-2, eps=1e-2, seed=5)
    reference = ReferenceZO(twin, config, loss_fn=candidate_loss, compute_dtype=torch.bfloat16)
    async with zoruntime.Runtime(model, config, loss_fn=candidate_loss, compute_dtype=torch.bfloat16,
                                 policy=MemoryBudget(10**9)) as rt:  # fmt: skip
        for _ in range(2):
            assert await rt.step(raw) == reference.step(raw)
        accuracy = await rt.evaluate(raw, metric=candidate_accuracy)
    assert accuracy in (0.0, 0.5, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))


@pytest.mark.asyncio
@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
async def test_lr_zero_never_drifts_with_chunked_ends(dtype: torch.dtype) -> None:
    model = tiny_model("llama_gqa", dtype=dtype, num_hidden_layers=2)
    before = [p.detach().clone() for p in model.parameters()]
    async with zoruntime.Runtime(model, zoruntime.ZOSGD(lr=0.0, eps=1e-2, weight_decay=0.3)) as rt:
        for i in range(3):
            await rt.step(token_batch(model.config, seed=i))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
