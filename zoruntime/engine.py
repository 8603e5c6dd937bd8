"""``Runtime``: the offloaded ZO-SGD runtime that users ``await`` in their own async code.

    async with Runtime(model, ZOSGD(lr=1e-6, eps=1e-3), device="cpu", policy=FixedDepth(2)) as rt:
        stats = await rt.step(batch)
    # here ``model`` holds the trained weights

Wires the pieces together: the model's adapter (its units and groups), the plan the policy
chooses from the memory model, the storage, the task graphs, the task work and the
scheduler's lanes. A step's update goes into the update log and is applied to each group the
next time that group is on the compute device; ``flush`` (and leaving the ``async with``)
applies what is pending and writes everything back into the model.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Coroutine, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from .checkpoint import group_snapshot, layout_fingerprint, save_checkpoint
from .device.base import Backend, backend_for
from .device.graphs import CUDAGraphs
from .distributed import LossReducer, agreed_max, causal_lm_weight, row_weight, world
from .models.adapter import ModelAdapter, adapter_for
from .models.batch import Batch, LossFn, map_tensors
from .models.shapes import shape_dims
from .planning.directions import directions_for
from .planning.planner import Workload
from .planning.profiles import GPUProfile, load_profile
from .policies.base import FixedDepth, Plan, Policy, out_of_memory_advice, plan_for, unit_of
from .runtime import RuntimeStatistics
from .runtime.graph import Kind, Task, TaskGraph, graph_named, load_graph
from .runtime.instruments import Instruments
from .runtime.scheduler import Scheduler, TaskFailed
from .storage import Storage, compute_dtype_for, finer_layouts, model_layout
from .tracing.recorder import Timeline, TimelineRecorder
from .work import Mode, StepState, TaskWork, finite_values
from .zo.config import ZOSGD
from .zo.directions import DirectionSampler, step_seed
from .zo.estimator import UNPERTURBED, Estimator, estimator_for
from .zo.log import UpdateLog
from .zo.stats import StepStats

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop when it is installed, on asyncio's own loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


_HELD: weakref.WeakKeyDictionary[nn.Module, Runtime] = weakref.WeakKeyDictionary()
"""Each model an open runtime holds (its weights live in that runtime's buffers until it closes)."""


class Runtime:
    """Offloaded ZO-SGD on a causal LM (see ``zoruntime.models.ADAPTERS``). Use as ``async with``;
    one step at a time."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: ZOSGD,
        *,
        device: str | torch.device = "cpu",
        policy: Policy | None = None,
        loss_fn: LossFn | None = None,
        compute_dtype: torch.dtype | None = None,
        trace: bool = False,
        instruments: Iterable[object] = (),
        start_step: int = 0,
        profile: GPUProfile | str | None = None,
        cuda_graphs: bool = False,
    ) -> None:
        if not isinstance(optimizer, ZOSGD):
            raise TypeError(f"optimizer must be zoruntime.ZOSGD(lr=..., eps=...), got {type(optimizer).__name__}")
        policy = policy if policy is not None else FixedDepth(1)
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must have a plan(layout) method (see zoruntime.policies), got {policy!r}")
        self.adapter: ModelAdapter = adapter_for(model, unit=unit_of(policy))
        self.model = model
        self.optimizer = optimizer
        self.policy = policy
        self._layouts = [layout for layout, _ in self.adapter.groups()]
        self._device = device
        master = self._layouts[self.adapter.units.streamable[0].group].dtype
        self.compute_dtype = compute_dtype_for(master, compute_dtype)
        self.layout = model_layout(self.adapter, self.compute_dtype, several_directions=optimizer.directions != 1)
        self.plan: Plan = plan_for(policy, self.layout)
        if not any(layout.trainable for layout in self._layouts):
            raise ValueError(
                "every parameter of the model has requires_grad=False: nothing to train; unfreeze some "
                "(zoruntime trains exactly the parameters with requires_grad=True)"
            )
        self.rounding = optimizer.rounding_for(master)
        self._log = UpdateLog()
        # the GPU profile directions="auto" predicts with (None: the device's built-in one)
        self._profile = load_profile(profile) if isinstance(profile, str) else profile
        self._estimator: Estimator | None = None  # directions="auto": decided at the first step
        if optimizer.directions != "auto":
            self._estimator = estimator_for(optimizer.estimator, optimizer.eps, self.compute_dtype,
                                            int(optimizer.directions))  # fmt: skip
        self._loss_fn = loss_fn  # None: the causal-LM loss, computed in pieces (adapter.head_loss)
        self._loss_weight = causal_lm_weight if loss_fn is None else row_weight
        self.rank, self.world_size = world()
        self._recorder = TimelineRecorder(bytes_of=self._bytes_moved) if trace else None
        self._instruments = Instruments([*instruments, *([self._recorder] if self._recorder else [])])
        self._graphs: dict[tuple[str, int], TaskGraph] = {}  # (name, rotation) → graph, made on first use
        self._rotation = 0  # the slot where the next pass starts streaming (slots turn across passes)
        self._backend: Backend | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the event loop that opened it
        self._work: TaskWork | None = None
        self._reducer: LossReducer | None = None
        self._scheduler: Scheduler | None = None
        self._busy: str | None = None  # the call whose graph runs now ("rt.step()", ...), None when idle
        self._idle: asyncio.Future[None] | None = None  # resolved when that call's graph has finished
        self._closing = False
        self._broken: BaseException | None = None
        self._last_pass: tuple[int, str] | None = None  # (step, phase) of the last pass started
        if not isinstance(start_step, int) or start_step < 0:
            raise ValueError(
                f"start_step must be an int >= 0 (the step a resumed run continues from), got {start_step!r}"
            )
        if cuda_graphs and torch.device(device).type != "cuda":
            raise ValueError(
                f"cuda_graphs=True replays whole blocks' forwards from CUDA graphs and needs device='cuda', "
                f"not {str(device)!r}; leave cuda_graphs off on a CPU"
            )
        self._cuda_graphs = cuda_graphs  # whole blocks' perturbed forwards replayed (device/graphs.py)
        self.step_index = start_step
        self.skipped_steps = 0
        self.failed_steps = 0

    # -- lifetime ---------------------------------------------------------------------------
    def _allocate(self, backend: Backend) -> Storage:
        try:
            return Storage(self.adapter, self.plan, backend, self.compute_dtype, self.layout.step_span)
        except torch.OutOfMemoryError as error:
            free = backend.free_bytes() or 0
            what = f"{type(self.policy).__name__} (depth {self.plan.depth}, {len(self.plan.resident)} resident)"
            finer = finer_layouts(self.model, getattr(self.policy, "unit", "block"), self.compute_dtype)
            raise MemoryError(out_of_memory_advice(self.layout, self.plan, free, what, finer)) from error

    async def open(self) -> Runtime:
        """Lay out the weights, allocate buffers, bring resident blocks to the compute device."""
        if self._backend is not None:
            raise RuntimeError("this runtime is already open")
        if _HELD.get(self.model, self) is not self:
            raise RuntimeError(
                "another open Runtime holds this model: close it first (two runtimes over one model would each "
                "write their weights back over the other's)"
            )
        backend = backend_for(self._device, timing=self._recorder is not None)
        try:
            storage = self._allocate(backend)
            backend.ready()
            self._reducer = LossReducer() if self.world_size > 1 else None
            self._work = TaskWork(
                self.adapter,
                storage,
                DirectionSampler(backend.device),
                self.optimizer.weight_decay,
                self.rounding,
                self._log,
                self._loss_fn,
                reducer=self._reducer,
                loss_weight=self._loss_weight,
                graphs=CUDAGraphs(backend.device) if self._cuda_graphs else None,
            )
            self._scheduler = Scheduler(backend.lanes, backend.clock, self._instruments)
            self._backend = backend
            self._loop = asyncio.get_running_loop()
            await self._execute(load_graph(self.adapter.units, self.plan), self.step_index)  # before that step
        except BaseException:
            backend.close()
            self._backend = self._loop = None
            raise
        _HELD[self.model] = self
        return self

    async def close(self) -> None:
        """Wait for a call still running (a step started with ``asyncio.create_task`` and not awaited,
        say), apply the pending update, write every weight back into the model, release the lanes.

        Calls made while it closes are refused. If it cannot write the weights back (the flush
        fails, or ``close`` is cancelled while it waits), it raises and leaves the runtime open with
        the weights in it: ``await rt.close()`` again writes them back. The lanes are never shut
        under a running step."""
        if self._backend is None:
            return
        try:
            await asyncio.sleep(0)  # calls created just before (create_task) start first: waited for, not refused
            self._closing = True
            while self._idle is not None:  # asyncio.wait: neither raises the call's error nor cancels it
                await asyncio.wait([self._idle])
            if self._backend is None:  # a concurrent close() finished it
                return
            if self._broken is None:
                await self._run("flush", None, self.step_index, closing=True)
        except BaseException as error:
            if self._broken is None:
                self._closing = False
                error.add_note(
                    "the runtime is still open and holds every weight (the pending update is kept, not lost): "
                    "await rt.close() again to write them back into the model"
                )
                raise
            self._shut()  # the device failed: nothing more can be written back (see _ready's message)
            raise
        self._shut()

    def _shut(self) -> None:
        _HELD.pop(self.model, None)
        backend, self._backend = self._backend, None
        self._closing = False
        self._work = self._scheduler = None  # the buffers go now, not when the garbage collector runs
        self._loop = None
        if backend is not None:
            backend.close()

    async def __aenter__(self) -> Runtime:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- steps ----------------------------------------------------------------------------------
    def _ready(self, what: str, *, closing: bool = False) -> tuple[TaskWork, Scheduler]:
        """Refuse ``what`` unless the runtime is open, sound and idle; changes nothing either way."""
        if self._backend is None or self._work is None or self._scheduler is None:
            raise RuntimeError(f"open the runtime before {what}: use `async with Runtime(...) as rt:`")
        if self._broken is not None:
            raise RuntimeError(
                f"the runtime stopped: the device failed while recovering from a failed step ({self._broken}); "
                "close it and resume from the last checkpoint"
            )
        if self._busy is not None:
            raise RuntimeError(
                f"{what} was called while another step runs; await each call before the next ({self._busy} "
                "has not finished: a runtime runs one step, evaluation or flush at a time, so two calls "
                "given to asyncio.gather() or create_task() at once are refused)"
            )
        if self._closing and not closing:
            raise RuntimeError(
                f"{what} was called while the runtime closes (leaving `async with` writes the weights back); "
                "call it inside the block and await it there"
            )
        return self._work, self._scheduler

    async def _follow_loop(self, what: str) -> None:
        """Go on under the running event loop when the one that ran the earlier calls has ended
        (one ``asyncio.run()`` a call, say), as after a failed pass: the work that ran behind
        those calls finished or was cancelled with that loop, each task whole or not at all (the
        stamps say which update each copy holds), so the device is drained and the next pass
        waits on nothing of theirs. Refuse ``what`` while that loop still runs; changes nothing."""
        loop = asyncio.get_running_loop()
        if self._loop is None or self._loop is loop:
            return
        if not self._loop.is_closed():
            raise RuntimeError(
                f"{what} was called on another event loop than the one running the runtime, which has not "
                "ended; nothing was changed. Make every call on one loop (or close the runtime on its own first)"
            )
        assert self._backend is not None and self._scheduler is not None
        await self._backend.drain()
        self._backend.take_timings()
        self._scheduler.forget()
        self._loop = loop

    def _claim(self, what: str, *, closing: bool = False) -> TaskWork:
        """Make ``what`` the one call that owns the runtime until ``_release``, or refuse it (and
        change nothing). Between ``_ready`` and the owner's first await nothing can interleave."""
        work, _ = self._ready(what, closing=closing)
        self._busy = what
        self._idle = asyncio.get_running_loop().create_future()
        return work

    def _release(self) -> None:
        """Only the owner calls this (in a ``finally``): a refused call never reaches it."""
        self._busy = None
        idle, self._idle = self._idle, None
        if idle is not None:
            idle.set_result(None)

    async def _run(self, graph: str, state: StepState | None, step: int, *, closing: bool = False) -> None:
        what = "rt.step()" if graph.startswith("step") else {"eval": "rt.evaluate()"}.get(graph, "rt.flush()")
        await self._follow_loop(what)  # every call comes through here: step, evaluate, flush, checkpoint, close
        work = self._claim(what, closing=closing)
        backend = self._backend
        assert backend is not None
        work.begin(state)
        phase, started = self._graph(graph).phase, False
        try:
            if self._last_pass == (step, phase):  # an evaluation again, a retry: the one before ends first
                await self._settle_behind()
            self._last_pass, started = (step, phase), True
            await self._execute(self._graph(graph), step)
        except BaseException as error:
            # The step is abandoned, the weights are not: every group's stamp says which update it
            # holds, so the pending one is neither lost nor applied twice by the next pass. Wait
            # for the device to finish what was enqueued so the stamps describe the device.
            if isinstance(error, TaskFailed) and (error.step, error.task.phase) != (step, self._graph(graph).phase):
                error.add_note(
                    f"it failed behind that earlier pass, which had already returned; this call ({what}, step "
                    f"{step}) was abandoned with it: call it again (nothing was lost)"
                )
            self.failed_steps += 1
            try:
                await backend.drain()
                backend.take_timings()
            except BaseException as error:
                self._broken = error
            if self._recorder is not None and started:
                self._recorder.abandoned(step, phase)
            raise
        finally:
            work.end()
            self._release()
        self._log.settle(work.oldest_held())  # what every group's authoritative copy holds is done

    async def _settle_behind(self) -> None:
        """Wait for the work earlier passes left running behind, and report its times: a pass
        of the same step and phase as the one before (a second evaluation, a retry) then starts
        with nothing of that one still running, so the timeline tells the two apart."""
        backend, scheduler = self._backend, self._scheduler
        assert backend is not None and scheduler is not None
        await scheduler.join()
        await backend.drain()
        self._report_timings()

    def _report_timings(self) -> None:
        """Report the device times of the tasks done so far (lanes that complete on enqueue: CUDA)."""
        assert self._backend is not None
        for span_step, task, start, end in self._backend.take_timings():
            self._instruments.call("task_started", span_step, task, start)
            self._instruments.call("task_finished", span_step, task, end)

    def _graph(self, name: str) -> TaskGraph:
        """The graph ``name`` ("step", "step without offloads", "eval", "flush") for this pass's rotation."""
        key = (name, self._rotation)
        if key not in self._graphs:
            self._graphs[key] = graph_named(self.adapter.units, self.plan, name, self._rotation)
        return self._graphs[key]

    async def _execute(self, graph: TaskGraph, step: int) -> None:
        """Run ``graph`` and wait until the device has done what the caller needs (a step's
        losses; all of a flush): the only place the host waits for the device. A step's last
        offloads and the next pass's first uploads go on behind it. Where lanes complete on
        enqueue (CUDA), the device times of the tasks done so far and the end of the step are
        reported to the instruments here."""
        backend, scheduler, work = self._backend, self._scheduler, self._work
        assert backend is not None and scheduler is not None and work is not None
        deferred = backend.completes_on_enqueue
        backend.begin_step(step)
        await scheduler.run(graph, work.for_task, step, mark_end=not deferred)
        self._rotation = graph.rotation_after
        await backend.drain(graph.waited_lanes)
        work.confirm_graphs()  # a graph that replayed other bits fails the pass, as a failed task would
        self._report_timings()
        if deferred:
            self._instruments.call("step_finished", step, backend.clock(), graph.phase)

    def _state(self, batch: Batch | Mapping[str, object], mode: Mode, step: int) -> StepState:
        self._ready("rt.step()" if mode is Mode.TRAIN else "rt.evaluate()")
        assert self._backend is not None
        validated = self.adapter.validate(batch)
        if mode is Mode.TRAIN and self._loss_fn is None and self.world_size == 1:  # a rank's shard may score
            validated.check_scored()  # nothing (its weight is 0): the ranks' sum is what counts
        # Positions and masks are built here, where the batch is (on the host, normally) and while
        # the previous pass's last copies still run; pinned, so the embed unit's copy is async.
        staged = map_tensors(self.adapter.prepare(validated, validated.input_ids.device, self.compute_dtype),
                             self._backend.staged)  # fmt: skip
        seed = step_seed(self.optimizer.seed, step)
        if mode is Mode.EVAL:  # no update: the schedule is asked for the steps that run, not for evaluations
            return StepState(mode, step, seed, 0.0, validated, UNPERTURBED, inputs=staged)
        lr = self.optimizer.lr_at(step)
        assert self._estimator is not None, "directions='auto' is decided before the first step's state"
        estimator = self._estimator
        return StepState(mode, step, seed, lr, validated, estimator.probes(), estimator, inputs=staged)

    @property
    def directions(self) -> int | None:
        """Directions per step (None: "auto", not decided before the first step)."""
        return self._estimator.directions if self._estimator is not None else None

    async def _decide_directions(self, batch: Batch | Mapping[str, object]) -> Estimator:
        """``directions="auto"`` for the first batch's shape (``directions_for``, in a worker thread:
        the planner's simulator runs an event loop of its own); data-parallel ranks take the
        largest q, so they run the same probes whatever their shards' rows."""
        assert self._backend is not None
        device, (rows, length) = self._backend.device, self.adapter.validate(batch).input_ids.shape
        blocks, unit = len({u.index for u in self.adapter.units.streamable}), getattr(self.policy, "unit", "block")
        work = Workload(self.layout, shape_dims(self.adapter.config), rows, length, unit, blocks,
                        cuda_graphs=self._cuda_graphs)  # fmt: skip
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        q = await asyncio.to_thread(directions_for, work, self.plan, self.optimizer.estimator, self._profile, gpu)
        q = agreed_max(q, device) if self.world_size > 1 else q
        return estimator_for(self.optimizer.estimator, self.optimizer.eps, self.compute_dtype, q)

    async def step(self, batch: Batch | Mapping[str, object]) -> StepStats:
        """One ZO-SGD step; its update is applied lazily, group by group, during the next pass."""
        t = self.step_index
        if self._estimator is None:  # directions="auto": decided once
            self._ready("rt.step()")
            self._estimator = await self._decide_directions(batch)
        state = self._state(batch, Mode.TRAIN, t)
        assert self._work is not None
        self._work.changed.clear()  # count this step's updates only (not a failed or an evaluation pass's)
        await self._run("step" if self.plan.offloads_at(t) else "step without offloads", state, t)
        stats = state.outcome(self._work.changed.take())
        if stats.skipped:  # a non-finite loss makes no update; the step still counts (its seed is used up)
            self.skipped_steps += 1
        else:
            assert state.update is not None
            self._log.add(state.update)
        self.step_index = t + 1
        return stats

    async def evaluate(self, batch: Batch | Mapping[str, object], metric: LossFn | None = None) -> float:
        """The loss at the current weights (or ``metric(logits, batch)``, e.g. an accuracy): an
        offloaded forward without perturbation. The pending update is applied on the way (and so
        is no longer pending). A loss or metric that is not finite raises ``FloatingPointError``
        saying so, never returns nan."""
        return (await self.measure(batch, {"value": metric}))["value"]

    async def measure(
        self, batch: Batch | Mapping[str, object], metrics: Mapping[str, LossFn | None]
    ) -> dict[str, float]:
        """Several metrics from one offloaded forward: name → ``metric(logits, batch)`` (``None``
        for the loss). As ``evaluate``, which is ``measure`` with one metric."""
        if not metrics:
            raise ValueError("measure() needs at least one metric, e.g. {'loss': None}")
        state = self._state(batch, Mode.EVAL, self.step_index)
        state.metrics = tuple(metrics.values())
        await self._run("eval", state, self.step_index)
        return finite_values(metrics, state.values)

    async def flush(self) -> None:
        """Apply the pending update to every group and write all weights back into the model."""
        await self._run("flush", None, self.step_index)

    # -- checkpoints ---------------------------------------------------------------------------------
    async def save_checkpoint(self, root: str | Path, state: Mapping[str, Any] | None = None) -> Path:
        """Apply the pending update, then snapshot every master group into ``root`` (atomically;
        see ``zoruntime.checkpoint``). ``state`` is stored beside it (e.g. the data position)."""
        self._ready("rt.save_checkpoint()")
        await self.flush()
        # Own the runtime while the snapshot is written, so no step changes the masters under it.
        work = self._claim("rt.save_checkpoint()")
        try:
            groups = group_snapshot(self.adapter, work.storage.host)
            meta = {"layout": layout_fingerprint(self.adapter), **(state or {})}
            writing = asyncio.ensure_future(asyncio.to_thread(save_checkpoint, root, self.step_index, groups, meta))
            try:
                return await asyncio.shield(writing)
            except asyncio.CancelledError:
                await asyncio.wait([writing])  # a thread cannot be interrupted: it reads the masters until done
                raise
        finally:
            self._release()

    # -- looking inside -----------------------------------------------------------------------------
    def _bytes_moved(self, task: Task) -> int:
        return self._layouts[task.unit.group].nbytes if task.kind in (Kind.UPLOAD, Kind.OFFLOAD) else 0

    @property
    def timeline(self) -> Timeline:
        """Every task's span so far. The last step's offloads and uploads ahead run behind it and
        appear once the next call (or leaving ``async with``) has waited for them."""
        if self._recorder is None:
            raise RuntimeError("tracing is off: create the runtime with Runtime(..., trace=True)")
        return self._recorder.timeline

    def statistics(self) -> RuntimeStatistics:
        return RuntimeStatistics(
            steps=self.step_index,
            num_units=self.layout.num_units,
            depth=self.plan.depth,
            resident_units=tuple(sorted(self.plan.resident)),
            slots=self.plan.slots(self.layout.num_units),
            unit_bytes=self.layout.unit_bytes,
            compute_bytes=self.layout.bytes_needed(self.plan),
            pending_update=len(self._log) > 0,
            skipped_steps=self.skipped_steps,
            failed_steps=self.failed_steps,
            world_size=self.world_size,
            bytes_all_reduced=self._reducer.bytes_reduced if self._reducer else 0,
        )
