"""Datasets from the Hugging Face hub on a machine that may not reach it: when the hub does not
answer, ``datasets`` is told it is offline for the call, so a cached dataset loads and a missing
one fails at once (the library would retry each request for about half a minute first).

Knows the two libraries' offline switches and nothing of tasks or records.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def offline_unless_reachable() -> Iterator[None]:
    """Within the block, ``datasets`` and ``huggingface_hub`` work offline if the hub cannot be
    reached (and as configured otherwise); their switches are restored after."""
    import datasets.config
    import huggingface_hub.constants

    from ..models.init import hub_reachable

    if datasets.config.HF_HUB_OFFLINE or os.environ.get("HF_DATASETS_OFFLINE") or hub_reachable():
        yield
        return
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved
