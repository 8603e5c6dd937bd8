"""Whole blocks' perturbed forwards captured as CUDA graphs and replayed: one launch where the
host issues a layer's forty-odd operations one by one (``Runtime(cuda_graphs=True)``).

A small model's step is paced by the host (an opt-1.3b block's task took an H200's host 2.1 ms
to issue against 1.8 ms for its upload), and the two forwards are about three quarters of the
operations a task issues (38 each, of about a hundred with the update a kernel). Every whole
block's perturbed forward reads its weights from the one scratch buffer its group shares with
the others (``Storage.scratch``), so a graph captured once for a block replays it in every step.
Each probe's hidden state lives in a buffer of its own that the graph updates in place (hidden ←
layer(hidden)): a block's output is the next block's input with no copy, and the step's first
block copies the embedding's output in. The tensors the layer takes from the step's inputs
(masks, positions, rotary tables) are copied into buffers of their own when a step brings new
ones. The graphs share one memory pool and hold nothing in it once captured, so they replay in
any order; a key's first call runs eagerly (a warm-up), its second captures.

The kernels replayed are the ones the forward launches, so the bits are the eager forward's (a
CUDA test checks the runtime against the reference, which runs eagerly). Each capture checks it
too: the step that captures a graph also runs that forward eagerly and compares, on the device,
the graph's first output with the eager one; ``confirm`` reads the comparisons once the step's
results are in (no wait of its own) and raises ``GraphMismatch`` naming the block if any
differed. Knows CUDA graphs and tensors; nothing of ZO, models or schedules.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Protocol

import torch

from ..models.batch import map_tensors

Layer = Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]
"""``layer(hidden, kwargs)``: a block bound to its weights, on the step's keyword inputs."""


class Replayable(Protocol):
    def replay(self) -> None: ...


def _signature(hidden: torch.Tensor, kwargs: dict[str, Any]) -> Hashable:
    """What a captured graph is good for: the shapes and types it read, which inputs were None."""

    def of(value: Any) -> Hashable:
        if isinstance(value, torch.Tensor):
            return ("tensor", tuple(value.shape), value.dtype, value.stride())
        if isinstance(value, tuple):
            return tuple(of(v) for v in value)
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise TypeError(f"a layer input of type {type(value).__name__} cannot be captured in a CUDA graph")

    return of(hidden), tuple(sorted((name, of(value)) for name, value in kwargs.items()))


def _copy_into(buffers: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        buffers.copy_(value)
    elif isinstance(value, tuple):
        for buffer, part in zip(buffers, value, strict=True):
            _copy_into(buffer, part)


class GraphMismatch(RuntimeError):
    """A captured graph's output differed from the eager forward's on the same inputs."""


class CUDAGraphs:
    """Replays each (block, probe)'s forward from a graph on the current stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pool = torch.cuda.graph_pool_handle()
        self._capture_stream = torch.cuda.Stream(device=device)
        self._graphs: dict[Hashable, Replayable] = {}
        self._warm: set[Hashable] = set()
        self._hidden: dict[tuple[int, Hashable], torch.Tensor] = {}  # (probe, signature) → its stream's buffer
        self._inputs: dict[Hashable, tuple[dict[str, Any], dict[str, Any]]] = {}  # signature → (buffers, copied)
        self._checks: list[tuple[str, int, torch.Tensor]] = []  # (block, probe, whether a new graph's output differed)

    def forward(
        self, name: str, probe: int, layer: Layer, hidden: torch.Tensor, kwargs: dict[str, Any]
    ) -> torch.Tensor:
        """Block ``name``'s forward for probe ``probe``: ``layer(hidden, kwargs)``, from a graph
        once one is captured. The result is the probe's buffer, overwritten by its next forward."""
        signature = _signature(hidden, kwargs)
        key = (name, probe, signature)
        if key not in self._warm:
            self._warm.add(key)
            return layer(hidden, kwargs)
        buffer = self._hidden.get((probe, signature))
        if buffer is None:
            buffer = self._hidden[(probe, signature)] = torch.empty_like(hidden)
        if hidden is not buffer:  # the step's first block: the embedding's output
            buffer.copy_(hidden)
        inputs = self._step_inputs(signature, kwargs)
        graph = self._graphs.get(key)
        if graph is not None:
            graph.replay()
            return buffer
        expected = layer(buffer, inputs)  # eagerly, before the replay overwrites the buffer it reads
        graph = self._graphs[key] = self._capture(layer, buffer, inputs)
        graph.replay()
        self._checks.append((name, probe, torch.ne(buffer, expected).any()))
        return buffer

    def confirm(self) -> None:
        """Raise ``GraphMismatch`` if a graph captured since the last call replayed other bits than
        its eager forward; call it once the step's results are read (its comparisons are done by then)."""
        checks, self._checks = self._checks, []
        wrong = [(name, probe) for name, probe, differs in checks if bool(differs)]
        if wrong:
            name, probe = wrong[0]
            raise GraphMismatch(
                f"the CUDA graph captured for {name} (probe {probe}) gave other bits than its eager forward "
                f"({len(wrong)} of {len(checks)} graphs captured this step differed): this step is dropped and the "
                "run goes on without CUDA graphs (call again); please report it with your torch and GPU versions"
            )

    def _step_inputs(self, signature: Hashable, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The buffers the graphs of this signature read the step's inputs from, refilled when
        the step's inputs are not the ones last copied."""
        found = self._inputs.get(signature)
        if found is None:
            found = self._inputs[signature] = (map_tensors(kwargs, torch.empty_like), {})
        buffers, copied = found
        for name, value in kwargs.items():
            if copied.get(name) is not value:
                _copy_into(buffers[name], value)
                copied[name] = value  # held until the next step's replace it: small tensors
        return buffers

    def _capture(self, layer: Layer, buffer: torch.Tensor, inputs: dict[str, Any]) -> Replayable:
        """A graph of ``buffer ← layer(buffer, inputs)``, captured on a side stream after the work
        already enqueued on the current one; not yet run."""
        current = torch.cuda.current_stream(self.device)
        side = self._capture_stream
        side.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            if not self._graphs:  # the side stream's first kernels (cuBLAS's workspace) outside any graph
                layer(buffer, inputs)
            graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
            try:
                buffer.copy_(layer(buffer, inputs))
            finally:
                graph.capture_end()
        current.wait_stream(side)
        return graph
