"""A decoder layer cut into streaming units finer than the layer, and its forward run one unit at
a time without copying the forward.

Cutting: the layer's modules that own parameters, in the order its forward calls them (traced
once per layer shape on the meta device: no memory, no arithmetic), are cut into contiguous
segments. ``"half"``: before the first module after the attention; ``"linear"``: before each
module with a matrix, small norms riding with the linear before them, then consecutive linears
packed together while they fit in the largest one's size (OPT's q, k, v and out projections,
4h² in all, beside fc1's 4h²: its blocks stream as attention, fc1, fc2). Slots hold the largest
unit, so packing costs no memory; units of equal size keep the link busy, where a small unit's
upload waits for a slot that a large unit's offload still holds (the planner's simulator, with
the units' sizes, put opt-175b cut at every linear at 0.66x the floor on an H200 at depth 1,
0.68x measured). A segment's weights are needed only while its modules run, so a unit that
holds just them can be uploaded, used and dropped before the next one arrives.

Running: ``SegmentedLayer`` is a copy of the layer bound to given tensors (``bind_layer``)
with a pre-hook on the first module of every segment but the first. ``SegmentRun`` runs one
forward of it in a greenlet on the caller's thread and pauses at those hooks: ``resume()`` lets
it run up to the next segment (or to its end) and returns when it has paused, so the caller can
swap the weights the next segment reads between two calls. It is HF's own forward, paused: the
same kernels on the same values, so the same bits as the whole layer run at once. (A greenlet
switch costs about 1 µs where a handoff between threads costs 100 µs on a small VM, and a thread
started per forward 180 µs more: a block in six linear units paused for every probe.)

Also binding itself: ``bind_layer`` (a copy of a layer whose weights are given tensors), used for
whole blocks too, and ``call_bound`` (a weightless copy run once on given tensors: the ends).
Knows modules, hooks and greenlets; nothing of ZO, groups or model families.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import greenlet
import torch
from torch import nn

from ..policies.base import UNIT_KINDS
from .groups import Params


def call_order(layer: nn.Module, run: Callable[[nn.Module], object]) -> list[str]:
    """The names of ``layer``'s modules that own parameters, in the order ``run(shell)`` calls
    them on a meta-device copy (modules never called come last)."""
    meta = {n: torch.empty(p.shape, dtype=p.dtype, device="meta") for n, p in layer.named_parameters()}
    shell = bind_layer(layer, meta)
    owners = [name for name, module in shell.named_modules() if any(True for _ in module.parameters(recurse=False))]
    order: list[str] = []
    handles = [
        shell.get_submodule(name).register_forward_pre_hook(lambda _m, _a, name=name: order.append(name))
        for name in owners
    ]
    try:
        with torch.no_grad():
            run(shell)
    finally:
        for handle in handles:
            handle.remove()
    seen: list[str] = []
    for name in order:
        if name in seen and seen[-1] != name:
            raise ValueError(f"{type(layer).__name__} calls {name} twice, apart: it cannot be cut into units")
        if name not in seen:
            seen.append(name)
    return seen + [name for name in owners if name not in seen]


def _has_matrix(module: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in module.parameters(recurse=False))


def cut(layer: nn.Module, order: Sequence[str], unit: str) -> list[list[str]]:
    """``order`` (module names in call order) cut into segments for ``unit`` (see the module's docstring)."""
    if unit not in UNIT_KINDS:
        raise ValueError(f"unit must be one of {', '.join(UNIT_KINDS)}, not {unit!r}")
    if unit == "block":
        return [list(order)]
    if unit == "half":
        attention = [i for i, name in enumerate(order) if "attn" in name.split(".")[0]]
        if not attention or attention[-1] == len(order) - 1:
            raise ValueError(f"{type(layer).__name__} has no attention module followed by others: no halves")
        return [list(order[: attention[-1] + 1]), list(order[attention[-1] + 1 :])]
    segments: list[list[str]] = [[]]
    for name in order:
        matrix = _has_matrix(layer.get_submodule(name))
        if matrix and any(_has_matrix(layer.get_submodule(n)) for n in segments[-1]):
            segments.append([])
        segments[-1].append(name)
    return _packed(layer, segments)


PACKING_SLACK = 1.01
"""A pack of linears may exceed the largest single one by this factor: the biases and norms
riding along (OPT's four attention projections carry 6h of them beside fc1's 4h)."""


def _packed(layer: nn.Module, segments: list[list[str]]) -> list[list[str]]:
    """Consecutive segments joined while their parameters fit in the largest segment's (with
    ``PACKING_SLACK``)."""
    sizes = [sum(p.numel() for n in seg for p in layer.get_submodule(n).parameters(recurse=False)) for seg in segments]
    room = max(sizes) * PACKING_SLACK
    packs: list[list[str]] = []
    held = room + 1  # nothing open yet
    for segment, size in zip(segments, sizes, strict=True):
        if held + size > room:
            packs.append([])
            held = 0
        packs[-1].extend(segment)
        held += size
    return packs


def segment_params(layer: nn.Module, segments: Sequence[Sequence[str]]) -> list[list[str]]:
    """The layer's parameter names (relative to it) of each segment, in the layer's own order."""
    owner = {name: i for i, modules in enumerate(segments) for name in modules}
    found: list[list[str]] = [[] for _ in segments]
    for name, _ in layer.named_parameters():
        found[owner[name.rpartition(".")[0]]].append(name)
    return found


_NOTHING = torch.empty(0)
"""What a shell holds in place of each weight until it is given one."""


def shell_of(module: nn.Module) -> nn.Module:
    """A copy of ``module`` without its weights (each parameter's place holds ``_NOTHING``)."""
    return copy.deepcopy(module, memo={id(p): _NOTHING for p in module.parameters()})


def bind_layer(layer: nn.Module, params: Params) -> nn.Module:
    """A copy of ``layer`` that shares no weights: each parameter's place holds the tensor of the
    same name in ``params``, so calling it runs the layer's own code on those tensors (as they are
    at the call) without rebinding them each time. Refuses params that lack one."""
    shell = shell_of(layer)
    _place(shell, params)
    if any(p is _NOTHING for p in shell.parameters()):
        raise ValueError("params lack some of the block's parameters")
    return shell


def bound_layer_call(shell: nn.Module) -> Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]:
    """``call(hidden, kwargs)``: a ``bind_layer`` copy's forward on the layer's keyword inputs,
    its hidden-state output alone (HF layers may return a tuple)."""

    def call(hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        out = shell(hidden, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    return call


def call_bound(shell: nn.Module, params: Mapping[str, torch.Tensor], *args: Any, **kwargs: Any) -> Any:
    """``shell`` (a ``shell_of`` copy) called with ``params`` (names relative to it; all of its
    parameters) in its parameters' places for this call alone: ``functional_call``'s effect at
    about the price of a plain module call (a sixth of it on a small module). One thread at a
    time per shell."""
    placed = _place(shell, params)
    try:
        return shell(*args, **kwargs)
    finally:
        for module, attr in placed:  # holds on to nothing between calls
            module._parameters[attr] = _NOTHING  # type: ignore[assignment]


def _place(shell: nn.Module, params: Mapping[str, torch.Tensor]) -> list[tuple[nn.Module, str]]:
    """Put each of ``params`` (names relative to ``shell``) in its parameter's place; where they went."""
    placed = []
    for name, tensor in params.items():
        owner, _, attr = name.rpartition(".")
        module = shell.get_submodule(owner)
        module._parameters[attr] = tensor  # type: ignore[assignment]
        placed.append((module, attr))
    return placed


class SegmentedLayer:
    """``layer`` bound to ``params`` (names relative to it) and paused before each segment after
    the first; ``start`` begins one forward."""

    def __init__(self, layer: nn.Module, params: Mapping[str, torch.Tensor], segments: Sequence[Sequence[str]]) -> None:
        self.shell = bind_layer(layer, params)
        self.segments = len(segments)
        for index, modules in enumerate(segments[1:], start=1):
            self.shell.get_submodule(modules[0]).register_forward_pre_hook(_pause_before(index))

    def start(self, call: Callable[[nn.Module], torch.Tensor]) -> SegmentRun:
        """A forward ``call(shell)``, not yet running."""
        return SegmentRun(lambda: call(self.shell))


def _pause_before(index: int) -> Callable[..., None]:
    def hook(_module: nn.Module, _args: object) -> None:
        run = getattr(greenlet.getcurrent(), "segment_run", None)  # no local holds the greenlet while paused
        if run is not None:
            run._pause(index)

    return hook


class _Forward(greenlet.greenlet):
    """The greenlet a ``SegmentRun``'s forward runs in (the hooks find their run through it)."""

    def __init__(self, run: SegmentRun) -> None:
        super().__init__(run._main)
        self.segment_run = run  # not ``run``: greenlet calls that one


class SegmentRun:
    """One forward run a segment at a time by ``resume``, in a greenlet: on the thread that
    calls ``resume`` (always the same one), under that thread's state at each call (its CUDA
    device and stream, its grad mode), so the forward's kernels go where the caller's would.
    Nothing in the forward may keep its greenlet in a local while paused: greenlet frames are
    not traversed by the garbage collector, so such a cycle would never be freed."""

    def __init__(self, forward: Callable[[], torch.Tensor]) -> None:
        self._forward = forward
        self._greenlet: _Forward | None = None
        self._thread = threading.get_ident()
        self.output: torch.Tensor | None = None
        self.next_segment = 0

    def _main(self) -> None:
        try:
            self.output = self._forward()
        finally:
            self.next_segment = -1

    def _pause(self, index: int) -> None:
        self.next_segment = index
        assert self._greenlet is not None and self._greenlet.parent is not None
        self._greenlet.parent.switch()

    def resume(self) -> torch.Tensor | None:
        """Run up to the next segment's start; the layer's output once it has run to its end."""
        if self._thread != threading.get_ident():
            raise RuntimeError("a segmented forward is resumed on the thread that began it")
        if self._greenlet is None:
            if self.next_segment != 0:
                raise RuntimeError("this forward has ended")
            self._greenlet = _Forward(self)
        try:
            self._greenlet.switch()  # an error in the forward is raised here
        finally:
            if self._greenlet.dead:
                self._greenlet = None  # greenlet and run no longer hold each other
        return self.output if self.next_segment == -1 else None

    def cancel(self) -> None:
        """End a paused forward (its step failed). On its own thread it unwinds at once; from
        another, it is dropped, and greenlet unwinds it the next time that thread switches."""
        forward, self._greenlet = self._greenlet, None
        if forward is not None and not forward.dead and self._thread == threading.get_ident():
            forward.throw(greenlet.GreenletExit)
