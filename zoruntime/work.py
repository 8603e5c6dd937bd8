"""The work of each task: the torch side of a step, handed to whichever lane runs the task.

A unit's task first brings its group's weights up to date (every update in the log that the
group's copy does not hold yet, oldest first), then runs the unit's stage once per probe: in a
step on ``θ + scale·z_d`` (the step's estimator says which probes: two per direction, or one at
θ and one per direction), in an evaluation on the weights themselves. A block's perturbed copy
is written whole into a scratch buffer (z drawn into that same buffer and overwritten in place,
so drawn again for each probe; or, with 16-bit compute over fp32 masters, drawn once per
direction into a buffer of its own); a whole block's forward on its copy may replay from a CUDA
graph (``device/graphs.py``). The embed and head units (the kept group) never make a
whole copy: the vocabulary-sized parameters reach the stage as ``PerturbedRows``, built a chunk
of rows at a time, the rest of the group is perturbed whole, and their updates draw z a span at
a time. The embed unit also moves the batch's stage inputs (prepared and pinned on the host by
the call) to the device; the head unit turns the probes' losses into projected gradients and the
step's update (on
CUDA on the compute stream, so the next step's updates are ordered after it). Uploads and
offloads are single copies of a group. Knows nothing about scheduling or lanes, nor which
model family runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from .device.graphs import CUDAGraphs, GraphMismatch
from .distributed import LossReducer, causal_lm_weight, row_weight
from .models.adapter import ModelAdapter, Params
from .models.batch import Batch, LossFn, map_tensors
from .models.decoder import EndParams, SegmentStarter
from .models.groups import GroupLayout
from .models.segments import SegmentRun
from .runtime.graph import Kind, Task
from .runtime.units import Stage, Unit
from .storage import Storage
from .zo.directions import DirectionSampler
from .zo.estimator import Estimator, Probe, coefficients
from .zo.log import UpdateLog
from .zo.stats import StepStats
from .zo.update import (
    ChangeCount,
    PendingUpdate,
    PerturbedRows,
    Rounding,
    UpdateProgress,
    draw_direction,
    perturb_into,
    update_group,
)


class Mode(Enum):
    TRAIN = "train"
    EVAL = "eval"


@dataclass(slots=True)
class StepState:
    """What the tasks of one step (or evaluation) share; hidden states flow through the compute lane.

    ``hidden[i]`` is the hidden state of probe ``i``; ``values`` are the probes' losses in a
    step and the metrics' values in an evaluation (``None`` in ``metrics``: the training loss);
    ``estimator`` (a step's) turns the losses into ``grads`` and the update."""

    mode: Mode
    step: int
    seed: int
    lr: float
    batch: Batch  # validated, on the host
    probes: Sequence[Probe]
    estimator: Estimator | None = None
    metrics: Sequence[LossFn | None] = ()
    inputs: Any = None  # the adapter's stage inputs: staged on the host, moved to the device by the embed unit
    hidden: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    grads: torch.Tensor | None = None  # one projected gradient per direction
    update: PendingUpdate | None = None
    runs: dict[tuple[int, int], SegmentRun] = field(default_factory=dict)  # (block, probe): paused forwards

    def __post_init__(self) -> None:
        self.hidden = [None] * len(self.probes)

    def outcome(self, changed: float | None) -> StepStats:
        """A finished step's figures, read from the device at once (the step's one host sync).
        Skipped when a loss, g or coefficient is not finite (σ = 0 makes a one-sided step's inf)."""
        assert self.update is not None and self.grads is not None and self.estimator is not None
        probes, directions = len(self.probes), self.grads.numel()
        read = torch.cat([torch.stack(self.values).float(), self.grads, self.update.scaled_grads]).tolist()
        losses, grads = tuple(read[:probes]), tuple(read[probes : probes + directions])
        skipped = not all(math.isfinite(v) for v in read)
        return StepStats(self.step, self.seed, self.lr, losses, grads, skipped, changed, self.estimator.name)


_METHOD = {
    Kind.UPLOAD: "_upload",
    Kind.OFFLOAD: "_offload",
    Kind.UPDATE: "_up_to_date",
    **dict.fromkeys((Kind.EMBED, Kind.COMPUTE, Kind.EVAL, Kind.HEAD), "_run_unit"),
}
"""Each task kind's method, by name: bound methods kept on the instance would make a reference
cycle, and the buffers would then wait for the garbage collector after the runtime closes."""


class TaskWork:
    """Answers "what does this task do" with a callable for its lane."""

    def __init__(
        self,
        adapter: ModelAdapter,
        storage: Storage,
        sampler: DirectionSampler,
        weight_decay: float,
        rounding: Rounding,
        log: UpdateLog,
        loss_fn: LossFn | None,
        reducer: LossReducer | None = None,
        loss_weight: Callable[[Batch], torch.Tensor] = causal_lm_weight,
        graphs: CUDAGraphs | None = None,
    ) -> None:
        self.adapter = adapter
        self.storage = storage
        self.sampler = sampler
        self.weight_decay = weight_decay
        self.rounding = rounding
        self.log = log
        self.loss_fn = loss_fn
        self.reducer = reducer  # data-parallel runs: losses are averaged over ranks in the head
        self.loss_weight = loss_weight
        self.graphs = graphs  # whole blocks' perturbed forwards replayed from CUDA graphs
        # Which update each group's authoritative copy holds (the host master of a streamed group,
        # the device buffer of one that stays there): the step of the last update applied, -1 for
        # none. A step that fails part-way leaves some groups updated and some not; these stamps
        # keep an update from being lost or applied twice.
        self.stamps: dict[int, int] = {}
        self._slot_holds: dict[int, int] = {}
        # group staying on the device → how far the update that failed part-way on it had got
        self._progress: dict[int, UpdateProgress] = {}
        self.changed = ChangeCount()  # how many sampled elements the applied updates changed
        # unit → its block's layer bound to the scratch buffer
        self._bound: dict[str, Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]] = {}
        self._bound_segments: dict[int, SegmentStarter] = {}  # block → its segmented copy bound to scratch
        self._groups_of_block: dict[int, list[int]] = {}
        for u in adapter.units.streamable:
            self._groups_of_block.setdefault(u.index, []).append(u.group)
        self.state: StepState | None = None

    def for_task(self, task: Task) -> Callable[[], None]:
        run: Callable[[Task], object] = getattr(self, _METHOD[task.kind])

        @torch.no_grad()
        def work() -> None:
            run(task)

        return work

    def begin(self, state: StepState | None) -> None:
        """The tasks that follow belong to ``state`` (None: a flush or a load)."""
        self.end()
        self.state = state

    def end(self) -> None:
        """The step is over; a forward a failure left paused inside a block is ended."""
        if self.state is not None:
            for run in self.state.runs.values():
                run.cancel()
            self.state.runs.clear()
        self.state = None

    def confirm_graphs(self) -> None:
        """Once a step's results are read: raise ``GraphMismatch`` if a CUDA graph it captured
        replayed other bits than its eager forward, and run eagerly from then on."""
        if self.graphs is None:
            return
        try:
            self.graphs.confirm()
        except GraphMismatch:
            self.graphs = None
            raise

    def oldest_held(self) -> int:
        """The newest step whose update every trained group's authoritative copy holds (a frozen
        group takes no update)."""
        return min(self.stamps.get(layout.group, -1) for layout in self.storage.layouts if layout.trainable)

    # -- groups ------------------------------------------------------------------------------------
    def _upload(self, task: Task) -> None:
        group = task.unit.group
        self.storage.weights(group, task.slot).copy_(self.storage.host[group], non_blocking=True)

    def _offload(self, task: Task) -> None:
        s, group = self.storage, task.unit.group
        s.host[group].copy_(s.weights(group, task.slot), non_blocking=True)
        if not s.on_device(group):  # the host master is the authoritative copy again
            assert task.slot is not None
            self.stamps[group] = self._slot_holds[task.slot]

    def _up_to_date(self, task: Task) -> torch.Tensor:
        """The group's compute-side weights with every logged update it lacks applied, in order."""
        s, group = self.storage, task.unit.group
        weights, layout = s.weights(group, task.slot), s.layouts[group]
        if not layout.trainable:  # frozen: no update ever changes it
            return weights
        holds = self.stamps.get(group, -1)
        missing = self.log.missing(holds)
        z = s.kept[group].z if group in s.kept else s.direction(group)  # a kept group's: a span at a time
        for update in missing:
            progress = None
            if s.on_device(group):  # the authoritative copy: an update that fails part-way goes on from there
                progress = self._progress.get(group)
                if progress is None or progress.step != update.step:
                    progress = self._progress[group] = UpdateProgress(update.step)
            update_group(weights, update, layout, self.sampler, z, s.step, self.changed, progress)
            self._progress.pop(group, None)
        if missing:
            holds = missing[-1].step
        if s.on_device(group):
            self.stamps[group] = holds
        else:  # a streamed group's slot is a copy; its master changes when the slot is offloaded
            assert task.slot is not None
            self._slot_holds[task.slot] = holds
        return weights

    # -- units ---------------------------------------------------------------------------------------
    def _run_unit(self, task: Task) -> None:
        st, s, unit = self._current(), self.storage, task.unit
        layout = s.layouts[unit.group]
        if unit.stage is Stage.EMBED:  # the inputs were prepared (and pinned) on the host by the call
            st.inputs = map_tensors(st.inputs, lambda t: t.to(s.device, non_blocking=True))
        weights = self._up_to_date(task)
        unperturbed = st.mode is Mode.EVAL or not layout.trainable  # frozen: every probe runs the weights
        if unit.group in s.kept:
            for i, probe in enumerate(st.probes):
                scale = None if unperturbed or not probe.perturbed else probe.scale
                self._stage(st, unit, i, self._kept_params(st, unit.group, weights, scale, probe.direction))
        elif unperturbed:
            for i in range(len(st.probes)):
                self._unperturbed_stage(st, unit, i, weights)
        else:
            self._perturbed_stages(st, unit, weights)
        if unit.stage is Stage.HEAD and st.mode is Mode.TRAIN:
            self._conclude(st)

    def _unperturbed_stage(self, st: StepState, unit: Unit, probe: int, weights: torch.Tensor) -> None:
        s = self.storage
        if unit.parts > 1:  # a segmented block reads its units' weights where its copy is bound
            s.scratch(unit.group).copy_(weights)
            self._stage(st, unit, probe, s.scratch_views[unit.group])
        else:
            self._stage(st, unit, probe, _unperturbed(weights, s.scratch(unit.group), s.layouts[unit.group]))

    def _perturbed_stages(self, st: StepState, unit: Unit, weights: torch.Tensor) -> None:
        """Each probe's stage on its perturbed copy; z drawn for each probe where it lives in the
        copy's buffer, else once per direction into its own (the probes come direction by direction)."""
        s, layout = self.storage, self.storage.layouts[unit.group]
        scratch, z = s.scratch(unit.group), s.direction(unit.group)
        views = s.scratch_views[unit.group]
        drawn = None
        for i, probe in enumerate(st.probes):
            if not probe.perturbed:  # a one-sided step's forward at θ
                self._unperturbed_stage(st, unit, i, weights)
                continue
            if s.directions_in_scratch or probe.direction != drawn:
                draw_direction(self.sampler, st.seed, layout, z, direction=probe.direction)
                drawn = probe.direction
            perturb_into(scratch, weights, z, probe.scale)
            self._stage(st, unit, i, views)

    def _kept_params(
        self, st: StepState, group: int, weights: torch.Tensor, scale: float | None, direction: int
    ) -> EndParams:
        """The kept group's parameters for one probe, ``θ + scale·z`` (z the step's direction
        ``direction``; ``scale`` None: θ in the compute dtype): the parameters that are not
        vocabulary-sized perturbed whole into their buffer, z drawn a span at a time; each
        vocabulary-sized one as rows built on demand."""
        s, layout, kept = self.storage, self.storage.layouts[group], self.storage.kept[group]
        if scale is None and weights.dtype == s.compute_dtype:
            return layout.views(weights)
        span = kept.z.numel()
        for piece, at in kept.rest_slices:
            for start in range(0, piece.numel, span):
                first, count = piece.offset + start, min(span, piece.numel - start)
                out, master = kept.rest[at + start : at + start + count], weights[first : first + count]
                if scale is None:
                    out.copy_(master)
                else:
                    z = draw_direction(self.sampler, st.seed, layout, kept.z[:count], first, direction, kept.drawn)
                    perturb_into(out, master, z, scale)
        rows = {p.name: PerturbedRows(weights, p, layout, self.sampler, st.seed, scale, kept.z, kept.rows[p.name],
                                      direction, kept.drawn)
                for p in layout.slices if p.name in kept.rows}  # fmt: skip
        return {**kept.rest_views, **rows}

    def _stage(self, st: StepState, unit: Unit, probe: int, params: EndParams) -> None:
        if unit.stage is Stage.EMBED:
            st.hidden[probe] = self.adapter.embed(params, st.inputs)
            return
        hidden = st.hidden[probe]
        assert hidden is not None
        if unit.stage is Stage.BLOCK:
            if unit.parts > 1:
                self._run_segment(st, unit, probe)
            elif params is self.storage.scratch_views[unit.group]:  # the perturbed copies: always these tensors
                layer, kwargs = self._bound_layer(unit), self.adapter.layer_inputs(unit.index, st.inputs)
                if self.graphs is None:
                    st.hidden[probe] = layer(hidden, kwargs)
                else:
                    st.hidden[probe] = self.graphs.forward(unit.name, probe, layer, hidden, kwargs)
            else:
                st.hidden[probe] = self.adapter.block(unit.index, _tensors(params), hidden, st.inputs)
            return
        batch = st.inputs.batch
        if st.mode is Mode.TRAIN:
            st.values.append(self._loss(params, hidden, batch))
            return
        if all(metric is None for metric in st.metrics):  # the loss alone: no full logits needed
            st.values = [self._loss(params, hidden, batch)] * len(st.metrics)
        else:  # the loss beside them is the one a step and evaluate() take (in pieces, for the causal LM)
            logits = self.adapter.head(params, hidden)
            st.values = [self._loss(params, hidden, batch, logits) if metric is None else metric(logits, batch)
                         for metric in st.metrics]  # fmt: skip
        if self.reducer is not None:  # each metric averaged over ranks with the weight it counts by
            for i, metric in enumerate(st.metrics):
                weight = row_weight(batch) if metric is not None else self.loss_weight(batch)
                (st.values[i],) = self.reducer.global_means([st.values[i]], weight)

    def _run_segment(self, st: StepState, unit: Unit, probe: int) -> None:
        """One unit of a block streamed as several: the probe's forward through the block, begun
        at its first unit, runs up to the next one (its weights are in the scratch buffer now);
        after the last, its output is the probe's hidden state."""
        key = (unit.index, probe)
        if unit.part == 0:
            hidden = st.hidden[probe]
            assert hidden is not None
            start = self._bound_segments.get(unit.index)
            if start is None:
                params = {
                    k: v for g in self._groups_of_block[unit.index] for k, v in self.storage.scratch_views[g].items()
                }
                start = self._bound_segments[unit.index] = self.adapter.segmented_block(unit.index, params)
            st.runs[key] = start(hidden, st.inputs)
        out = st.runs[key].resume()
        if unit.part == unit.parts - 1:
            del st.runs[key]
            assert out is not None, "a block's forward ends at its last unit"
            st.hidden[probe] = out

    def _bound_layer(self, unit: Unit) -> Callable[[torch.Tensor, dict[str, Any]], torch.Tensor]:
        """The unit's block bound to its group's scratch views, made on first use."""
        layer = self._bound.get(unit.name)
        if layer is None:
            layer = self._bound[unit.name] = self.adapter.bound_layer(
                unit.index, self.storage.scratch_views[unit.group]
            )
        return layer

    def _loss(
        self, params: EndParams, hidden: torch.Tensor, batch: Batch, logits: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The user's loss on full logits (``logits``, when the head has made them), or the
        causal-LM loss in pieces (``head_loss``)."""
        if self.loss_fn is None:
            return self.adapter.head_loss(params, hidden, batch)
        loss = self.loss_fn(self.adapter.head(params, hidden) if logits is None else logits, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            what = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else repr(loss)
            raise TypeError(f"loss_fn must return the batch's loss as a one-element tensor, got {what}")
        return loss

    def _conclude(self, st: StepState) -> None:
        """The head of a step: losses averaged over ranks, projected gradients, the step's update."""
        if self.reducer is not None:  # every rank now holds the same global losses, hence the same g
            st.values = self.reducer.global_means(st.values, self.loss_weight(st.inputs.batch))
        assert st.estimator is not None, "a step's state names its estimator"
        st.grads = st.estimator.projected_gradients(st.values)
        step = coefficients(st.estimator.name, st.grads)
        st.update = PendingUpdate.from_gradient(st.step, st.seed, st.lr, self.weight_decay, step, self.rounding)

    def _current(self) -> StepState:
        assert self.state is not None, "a step task ran outside a step"
        return self.state


def finite_values(metrics: Mapping[str, object], values: Sequence[torch.Tensor]) -> dict[str, float]:
    """An evaluation's ``values`` by the names of ``metrics`` (None: the loss), or a
    ``FloatingPointError`` saying which one is not finite and where to look."""
    named = {name: float(v) for name, v in zip(metrics, values, strict=True)}
    for name, value in named.items():
        if math.isfinite(value):
            continue
        if metrics[name] is not None:
            which = f" {name!r}" if len(metrics) > 1 else ""
            raise FloatingPointError(
                f"evaluation metric{which} is {value}: metric(logits, batch) returned a non-finite value; "
                "check the metric (an empty selection gives 0/0 = nan) and the weights (inf or nan weights "
                "give non-finite logits)"
            )
        raise FloatingPointError(
            f"evaluation loss is {value}: the weights or the batch give non-finite logits or loss; look for "
            "inf or nan in the model's parameters (a diverged run: lower lr or eps) and check that the batch "
            "has labels other than -100 (the pending update was applied as usual)"
        )
    return named


def _tensors(params: EndParams) -> Params:
    """A block's parameters: always tensors (only the kept group's may be row sources)."""
    assert all(isinstance(p, torch.Tensor) for p in params.values())
    return params  # type: ignore[return-value]


def _unperturbed(weights: torch.Tensor, scratch: torch.Tensor, layout: GroupLayout) -> dict[str, torch.Tensor]:
    """Views of the weights in the compute dtype (a cast copy in ``scratch`` when it differs)."""
    if weights.dtype == scratch.dtype:
        return layout.views(weights)
    return layout.views(scratch.copy_(weights))
