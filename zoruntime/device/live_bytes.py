"""The most bytes of tensors alive at once while some code runs, counted operation by operation:
for checking the memory model's activation figures (``memory.activation_bytes``) against a real
forward at a real shape, on the meta device, where a 175B block's activations take no memory.

Every tensor an operation returns is counted from then until its storage is freed (views share
their base's); tensors that existed before are not counted. Attention is counted as CUDA's
fused kernels hold it (its output and each row's log-sum-exp, never the T x T scores), since
on the meta device ``scaled_dot_product_attention`` falls back to the math that materialises
them. Knows PyTorch's dispatch; nothing of models or plans.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _FusedAttention(TorchFunctionMode):
    """``scaled_dot_product_attention`` as its fused CUDA kernels allocate: the output [..., T, Dv]
    and a float32 log-sum-exp a row, no scores."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        query, value = args[0], args[2] if len(args) > 2 else (kwargs or {})["value"]
        lse = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
        out = torch.empty((*query.shape[:-1], value.shape[-1]), dtype=query.dtype, device=query.device)
        del lse  # the kernel's, dropped once it returns
        return out


class LiveBytes(TorchDispatchMode):
    """``with LiveBytes() as live: ...`` then ``live.peak``: the most bytes of storages created
    inside that were alive at once (after each operation, its inputs still held)."""

    def __init__(self) -> None:
        super().__init__()
        self._alive: dict[int, tuple[StorageWeakRef, int]] = {}
        self._outside: dict[int, StorageWeakRef] = {}  # storages first seen as inputs: made before
        self.peak = 0
        self._attention = _FusedAttention()

    def __enter__(self) -> LiveBytes:
        self._attention.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self._attention.__exit__(*exc)

    @property
    def now(self) -> int:
        """Bytes of the counted storages alive now."""
        self._alive = {key: entry for key, entry in self._alive.items() if not entry[0].expired()}
        return sum(nbytes for _, nbytes in self._alive.values())

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self._outside = {key: ref for key, ref in self._outside.items() if not ref.expired()}
        for tensor in _tensors((args, kwargs)):  # a view of one of these (a weight's .t()) is not new memory
            storage = tensor.untyped_storage()
            if storage._cdata not in self._alive:
                self._outside.setdefault(storage._cdata, StorageWeakRef(storage))
        out = func(*args, **(kwargs or {}))
        for tensor in _tensors(out):
            storage = tensor.untyped_storage()
            if storage._cdata not in self._outside:
                self._alive.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))
        self.peak = max(self.peak, self.now)
        return out


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)]
