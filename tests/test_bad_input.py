"""Bad input gets a clear error that names the problem and the fix."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model
from transformers import GPT2Config, GPT2LMHeadModel

from zoruntime.engine import Runtime
from zoruntime.models import OPTAdapter
from zoruntime.zo import ZOSGD


@pytest.fixture(scope="module")
def adapter() -> OPTAdapter:
    return OPTAdapter(tiny_model())


def test_a_model_that_is_not_opt() -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32))
    with pytest.raises(TypeError, match=r"OPTForCausalLM.*got GPT2LMHeadModel.*from_pretrained"):
        OPTAdapter(gpt2)


@pytest.mark.parametrize(
    ("batch", "error", "pattern"),
    [
        ({"input_ids": torch.ones(2, 4)}, TypeError, r"integer token ids.*float32.*\.long\(\)"),
        ({"input_ids": torch.ones(2, 4, dtype=torch.bool)}, TypeError, r"integer token ids"),
        ({"input_ids": torch.ones(4, dtype=torch.long)}, ValueError, r"\[batch, sequence\].*unsqueeze"),
        ({"input_ids": torch.ones(1, 2, 4, dtype=torch.long)}, ValueError, r"\[batch, sequence\]"),
        ({"input_ids": torch.ones(0, 4, dtype=torch.long)}, ValueError, r"batch is empty"),
        ({"input_ids": torch.full((1, 4), 64)}, ValueError, r"\[0, 64\).*\[64, 64\]"),
        ({"input_ids": torch.full((1, 4), -1)}, ValueError, r"\[0, 64\).*\[-1, -1\]"),
        ({"input_ids": torch.ones(1, 49, dtype=torch.long)}, ValueError, r"49 is longer than.*48 positions"),
        (
            {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 5)},
            ValueError,
            r"attention_mask has shape \(2, 5\).*\(2, 4\)",
        ),
        (
            {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.full((2, 4), 2)},
            ValueError,
            r"only 0 \(padding\) and 1",
        ),
        (
            {"input_ids": torch.ones(2, 4, dtype=torch.long), "labels": torch.ones(2, 3, dtype=torch.long)},
            ValueError,
            r"labels have shape \(2, 3\)",
        ),
        ({"attention_mask": torch.ones(2, 4)}, KeyError, r"no 'input_ids'"),
        ([1, 2, 3], TypeError, r"mapping with 'input_ids'"),
    ],
)
def test_bad_batches(adapter: OPTAdapter, batch: object, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        adapter.validate(batch)  # type: ignore[arg-type]


def test_padded_positions_never_count_in_the_loss(adapter: OPTAdapter) -> None:
    ids = torch.tensor([[5, 6, 7, 1]])
    batch = adapter.validate({"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0]]), "labels": ids})
    assert batch.labels.tolist() == [[5, 6, 7, -100]]
    assert adapter.validate({"input_ids": ids}).labels.tolist() == [[5, 6, 7, 1]]


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"eps": 0.0}, r"eps must be a finite number > 0"),
        ({"eps": -1e-3}, r"eps must be"),
        ({"eps": math.nan}, r"eps must be"),
        ({"lr": -1e-6}, r"lr must be a finite number >= 0"),
        ({"lr": math.inf}, r"lr must be"),
        ({"lr": math.nan}, r"lr must be"),
        ({"weight_decay": -0.1}, r"weight_decay must be"),
        ({"seed": -1}, r"seed must be"),
    ],
)
def test_bad_optimizer_settings(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        ZOSGD(**kwargs)


def test_a_schedule_returning_a_bad_lr_fails_at_that_step() -> None:
    cfg = ZOSGD(lr=1e-3, lr_schedule=lambda step: 1e-3 if step < 2 else -1.0)
    assert cfg.lr_at(1) == 1e-3
    with pytest.raises(ValueError, match=r"lr_schedule\(2\) must be"):
        cfg.lr_at(2)


def test_cuda_graphs_on_a_cpu_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match=r"cuda_graphs=True .* needs device='cuda', not 'cpu'; leave cuda_graphs off"):
        Runtime(tiny_model(), ZOSGD(lr=1e-3), cuda_graphs=True)
