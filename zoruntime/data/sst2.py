"""SST-2 as MeZO does it: the prompt "<sentence> It was great." / "... terrible.", scored by
candidates.

Each example becomes one row per candidate word; the labels mark only the candidate's tokens.
The training loss is the cross-entropy over the candidates' summed log-likelihoods (the gold
word should be likelier), and evaluation picks the likelier candidate. The data comes from the
``datasets`` library's GLUE SST-2; offline, a clear message says how to get it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch.nn import functional as F

from ..models.batch import IGNORE_INDEX, Batch

WORDS = ("terrible", "great")  # label 0 = negative, 1 = positive


class DataUnavailable(RuntimeError):
    """The dataset cannot be had here; the message says how to get it."""


class Tokenizer(Protocol):
    pad_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def candidate_rows(
    prefix: str, candidates: Sequence[str], tokenizer: Tokenizer, max_length: int, suffix: str = "."
) -> list[tuple[list[int], list[int]]]:
    """One (token ids, labels) row per candidate: ``<prefix> <candidate><suffix>``; labels are
    -100 except on the candidate's tokens. The prefix is cut from the left to fit ``max_length``."""
    head_ids = tokenizer.encode(prefix, add_special_tokens=True)
    tail = tokenizer.encode(suffix, add_special_tokens=False) if suffix else []
    rows = []
    for word in candidates:
        candidate = tokenizer.encode(f" {word}", add_special_tokens=False)
        room = max_length - len(candidate) - len(tail)
        if room < 2:
            raise ValueError(f"--max-length {max_length} leaves no room for the prompt before {word!r}")
        head = keep_right(head_ids, room, tokenizer)
        ids = head + candidate + tail
        labels = [IGNORE_INDEX] * len(head) + candidate + [IGNORE_INDEX] * len(tail)
        rows.append((ids, labels))
    return rows


def keep_right(ids: list[int], room: int, tokenizer: Tokenizer) -> list[int]:
    """A prompt's ``ids`` cut from the left to ``room`` tokens, keeping the BOS token the
    tokenizer begins with, if it adds one (OPT, Llama do; GPT-2, Qwen2 add none)."""
    if len(ids) <= room:
        return ids
    bos = getattr(tokenizer, "bos_token_id", None)
    keep = 1 if bos is not None and ids[:1] == [bos] and tokenizer.encode("", add_special_tokens=True) == [bos] else 0
    return ids[:keep] + ids[len(ids) - room + keep :]


def prompt_rows(sentence: str, tokenizer: Tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """SST-2's rows: ``<sentence> It was <word>.`` for each of ``WORDS``."""
    return candidate_rows(f"{sentence.strip()} It was", WORDS, tokenizer, max_length)


def padded(rows: Sequence[tuple[list[int], list[int]]], pad_token_id: int | None) -> dict[str, torch.Tensor]:
    """Rows of (ids, labels), right-padded into ``input_ids``, ``attention_mask`` and ``labels``."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_token_id if pad_token_id is not None else 1)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, (row_ids, row_labels) in enumerate(rows):
        ids[r, : len(row_ids)] = torch.tensor(row_ids)
        labels[r, : len(row_labels)] = torch.tensor(row_labels)
        mask[r, : len(row_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def scored_batch(
    examples: Sequence[tuple[str, Sequence[str], int]], tokenizer: Tokenizer, max_length: int, suffix: str = "."
) -> dict[str, torch.Tensor]:
    """Rows for every (prefix, candidates, gold index): [examples × candidates, T], plus ``label``."""
    counts = {len(candidates) for _, candidates, _ in examples}
    if len(counts) != 1:
        raise ValueError(f"every example of a batch needs as many candidates; these have {sorted(counts)}")
    rows = [row for prefix, candidates, _ in examples for row in candidate_rows(prefix, candidates, tokenizer,
                                                                                  max_length, suffix)]  # fmt: skip
    return {**padded(rows, tokenizer.pad_token_id), "label": torch.tensor([gold for _, _, gold in examples])}


def candidate_batch(
    examples: Sequence[tuple[str, int]], tokenizer: Tokenizer, max_length: int
) -> dict[str, torch.Tensor]:
    """SST-2 rows for every (sentence, label): [examples × candidates, T], right-padded, plus ``label``."""
    return scored_batch([(f"{s.strip()} It was", WORDS, label) for s, label in examples], tokenizer, max_length)


def candidate_scores(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Summed log-likelihood of each row's candidate tokens: logits [R, T, V] → scores [examples, candidates]."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = batch.labels[:, 1:]
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    per_row = (picked * (targets != IGNORE_INDEX)).sum(dim=1)
    return per_row.view(batch.extras["label"].numel(), -1)  # each example's rows are consecutive


def candidate_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Cross-entropy of the gold candidate among the candidates."""
    return F.cross_entropy(candidate_scores(logits, batch), batch.extras["label"])


def candidate_accuracy(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Fraction of examples whose gold candidate is the likelier one."""
    return (candidate_scores(logits, batch).argmax(dim=1) == batch.extras["label"]).float().mean()


def load_sst2(train_examples: int, dev_examples: int, seed: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """GLUE SST-2 through ``datasets``: a seeded sample of the train split and the validation split."""
    try:
        import datasets
    except ImportError:
        raise DataUnavailable("--task sst2 needs the datasets library: pip install datasets") from None
    from .hub import offline_unless_reachable

    try:
        with offline_unless_reachable():
            glue: Any = datasets.load_dataset("glue", "sst2")
    except Exception as error:  # offline, missing cache, hub errors: all end the same way for the user
        raise DataUnavailable(
            "could not load GLUE SST-2 "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}); "
            "download it once on a machine with network: "
            "python -c \"import datasets; datasets.load_dataset('glue', 'sst2')\", "
            "then run with HF_DATASETS_OFFLINE=1"
        ) from None
    train = [(row["sentence"], int(row["label"])) for row in glue["train"]]
    dev = [(row["sentence"], int(row["label"])) for row in glue["validation"]]
    random.Random(seed).shuffle(train)
    return train[:train_examples], dev[:dev_examples]
