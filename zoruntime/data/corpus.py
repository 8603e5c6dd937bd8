"""A text corpus generated deterministically from a seed: short sentences from a small grammar.

Learnable from scratch by a tiny byte-level model (spelling, word order, punctuation) and
different every seed, so a train and a dev split never share a sentence stream. Uses
``random.Random(seed)``: never any global random state.
"""

from __future__ import annotations

import random

SUBJECTS = ["the cat", "a small dog", "the old man", "my sister", "the bird", "a farmer", "the teacher", "our team"]
VERBS = ["sees", "likes", "finds", "carries", "paints", "watches", "follows", "helps"]
OBJECTS = ["the red ball", "a green tree", "the quiet river", "an open door", "the moon", "a long road", "the garden"]
ENDINGS = ["today", "at night", "every morning", "in the rain", "again", "with care"]


def sentences(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        words = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]
        if rng.random() < 0.5:
            words.append(rng.choice(ENDINGS))
        out.append(" ".join(words) + ".")
    return out


def generated_corpus(seed: int = 0, train_sentences: int = 20_000, dev_sentences: int = 500) -> tuple[str, str]:
    """(train text, dev text) drawn from disjoint seeds."""
    return " ".join(sentences(2 * seed, train_sentences)), " ".join(sentences(2 * seed + 1, dev_sentences))
