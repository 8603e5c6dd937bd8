"""The work of each task kind: the torch side of a step, run on whichever lane the task is on.

For a step at seed s: the embed task applies the pending update to the resident group, draws
its direction and embeds the batch twice (on W+εz and on W−εz, each built in a scratch
buffer); a compute task applies the pending update to its block and runs both perturbed
forwards; the head task computes both losses and leaves the projected gradient, as a tensor
on the compute device, in the next pending update. Uploads and offloads are single copies.
Eval tasks run the unperturbed forward after applying the pending update. Knows nothing
about scheduling or lanes: it only answers "what does this task do".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch

from .distributed import LossReducer, causal_lm_weight, row_weight
from .models.batch import Batch
from .models.groups import GroupLayout
from .models.opt import LossFn, OPTAdapter, StageInputs
from .runtime.graph import Kind, Task
from .storage import Storage
from .zo.config import ZOSGD
from .zo.directions import RESIDENT_GROUP, DirectionSampler, block_group
from .zo.update import PendingUpdate, apply_update, perturb_into, projected_gradient


class Mode(Enum):
    TRAIN = "train"
    EVAL = "eval"


@dataclass(slots=True)
class StepState:
    """What the tasks of one step share; the hidden states flow through the compute lane."""

    mode: Mode
    step: int
    seed: int
    lr: float
    batch: Batch | None  # validated, on the host; moved to the device by the embed task
    metric: LossFn | None = None  # eval only: replaces the loss (e.g. an accuracy)
    inputs: StageInputs | None = None
    hidden_plus: torch.Tensor | None = None  # [B, T, H]
    hidden_minus: torch.Tensor | None = None  # [B, T, H]; unused in eval
    loss_plus: torch.Tensor | None = None
    loss_minus: torch.Tensor | None = None
    grad: torch.Tensor | None = None
    update: PendingUpdate | None = None  # built from grad on the compute lane (on CUDA: its stream)


class Executor:
    def __init__(
        self, adapter: OPTAdapter, storage: Storage, sampler: DirectionSampler, config: ZOSGD, loss_fn: LossFn
    ) -> None:
        self.adapter = adapter
        self.storage = storage
        self.sampler = sampler
        self.config = config
        self.loss_fn = loss_fn
        self.reducer: LossReducer | None = None  # set for data-parallel runs
        self.loss_weight: Callable[[Batch], torch.Tensor] = causal_lm_weight
        self.pending: PendingUpdate | None = None
        # Which update each group's authoritative copy holds (the host master of a streamed block,
        # the device buffer of a resident block or of the resident group): the step of the last
        # update applied, -1 for none. A step that fails part-way leaves some groups with the
        # pending update and some without; these stamps keep it from being lost or applied twice.
        self.applied: dict[int, int] = {}
        self._slot_holds: dict[int, int] = {}
        self.state: StepState | None = None
        self._kinds: dict[Kind, Callable[[Task], None]] = {
            Kind.EMBED: self._embed,
            Kind.UPLOAD: self._upload,
            Kind.COMPUTE: self._compute,
            Kind.OFFLOAD: self._offload,
            Kind.HEAD: self._head,
            Kind.UPDATE: self._update,
            Kind.EVAL: self._eval,
        }

    def work_for(self, task: Task) -> Callable[[], None]:
        run = self._kinds[task.kind]

        @torch.no_grad()
        def work() -> None:
            run(task)

        return work

    # -- helpers ------------------------------------------------------------------------------
    def _apply_pending(
        self, group: int, weights: torch.Tensor, z: torch.Tensor, decayed: list[torch.Tensor], holds: int
    ) -> int:
        """Apply the pending update to ``weights`` (which hold update ``holds``) unless they have it;
        returns the update they hold afterwards."""
        pending = self.pending
        if pending is None or holds >= pending.step:
            return holds
        self.sampler.draw(pending.seed, group, z)
        apply_update(weights, z, pending, decayed)
        return pending.step

    def pending_is_applied(self) -> None:
        """Every group has been through a complete pass: the pending update is in all of them."""
        self.pending = None

    def _unperturbed(
        self, weights: torch.Tensor, scratch: torch.Tensor, layout: GroupLayout
    ) -> dict[str, torch.Tensor]:
        """Views of the weights in the compute dtype (a cast copy in ``scratch`` when it differs)."""
        if weights.dtype == scratch.dtype:
            return layout.views(weights)
        return layout.views(scratch[: layout.numel].copy_(weights))

    def _current(self) -> StepState:
        assert self.state is not None, "a step task ran outside a step"
        return self.state

    # -- the group (embedding and head) ---------------------------------------------------------
    def _group_update(self) -> None:
        s, holds = self.storage, self.applied.get(RESIDENT_GROUP, -1)
        decayed = s.group_layout.decayed_views(s.group)
        self.applied[RESIDENT_GROUP] = self._apply_pending(RESIDENT_GROUP, s.group, s.group_z, decayed, holds)

    def _embed(self, task: Task) -> None:
        st, s = self._current(), self.storage
        assert st.batch is not None
        st.inputs = self.adapter.prepare(st.batch, s.group.device, s.compute_dtype)
        self._group_update()
        if st.mode is Mode.EVAL:
            st.hidden_plus = self.adapter.embed(self._unperturbed(s.group, s.group_scratch, s.group_layout), st.inputs)
            return
        self.sampler.draw(st.seed, RESIDENT_GROUP, s.group_z)
        perturb_into(s.group_scratch, s.group, s.group_z, self.config.eps)
        st.hidden_plus = self.adapter.embed(s.group_scratch_views, st.inputs)
        perturb_into(s.group_scratch, s.group, s.group_z, -self.config.eps)
        st.hidden_minus = self.adapter.embed(s.group_scratch_views, st.inputs)

    def _head(self, task: Task) -> None:
        st, s = self._current(), self.storage
        assert st.inputs is not None and st.hidden_plus is not None
        batch = st.inputs.batch
        if st.mode is Mode.EVAL:
            params = self._unperturbed(s.group, s.group_scratch, s.group_layout)
            st.loss_plus = (st.metric or self.loss_fn)(self.adapter.head(params, st.hidden_plus), batch)
            if self.reducer is not None:
                weight = row_weight(batch) if st.metric is not None else self.loss_weight(batch)
                (st.loss_plus,) = self.reducer.global_means([st.loss_plus], weight)
            return
        assert st.hidden_minus is not None
        perturb_into(s.group_scratch, s.group, s.group_z, self.config.eps)
        st.loss_plus = self.loss_fn(self.adapter.head(s.group_scratch_views, st.hidden_plus), batch)
        perturb_into(s.group_scratch, s.group, s.group_z, -self.config.eps)
        st.loss_minus = self.loss_fn(self.adapter.head(s.group_scratch_views, st.hidden_minus), batch)
        if self.reducer is not None:  # every rank now holds the same global losses, hence the same g
            st.loss_plus, st.loss_minus = self.reducer.global_means(
                [st.loss_plus, st.loss_minus], self.loss_weight(batch)
            )
        st.grad = projected_gradient(st.loss_plus, st.loss_minus, self.config.eps)
        # Built here, not by the caller: on CUDA its arithmetic then runs on the compute stream,
        # which the next step's updates run on too, so they are ordered after it by the stream.
        st.update = PendingUpdate.from_gradient(st.step, st.seed, st.lr, self.config.weight_decay, st.grad)

    # -- blocks -----------------------------------------------------------------------------------
    def _weights(self, task: Task) -> torch.Tensor:
        assert task.block is not None
        return self.storage.compute_buffer(task.block, task.slot)

    def _upload(self, task: Task) -> None:
        assert task.block is not None
        self._weights(task).copy_(self.storage.host_blocks[task.block], non_blocking=True)

    def _offload(self, task: Task) -> None:
        s = self.storage
        if task.block is None:
            s.host_group.copy_(s.group, non_blocking=True)
            return
        s.host_blocks[task.block].copy_(self._weights(task), non_blocking=True)
        if task.block not in s.resident_blocks:  # the host master is the authoritative copy again
            assert task.slot is not None
            self.applied[block_group(task.block)] = self._slot_holds[task.slot]

    def _block_update(self, task: Task) -> torch.Tensor:
        assert task.block is not None
        s, weights, group = self.storage, self._weights(task), block_group(task.block)
        holds = self._apply_pending(
            group, weights, s.z, s.block_layout.decayed_views(weights), self.applied.get(group, -1)
        )
        if task.block in s.resident_blocks:
            self.applied[group] = holds
        else:  # a streamed block's slot is a copy; its master changes when the slot is offloaded
            assert task.slot is not None
            self._slot_holds[task.slot] = holds
        return weights

    def _compute(self, task: Task) -> None:
        st, s = self._current(), self.storage
        assert task.block is not None and st.inputs is not None
        assert st.hidden_plus is not None and st.hidden_minus is not None
        weights = self._block_update(task)
        self.sampler.draw(st.seed, block_group(task.block), s.z)
        perturb_into(s.scratch, weights, s.z, self.config.eps)
        st.hidden_plus = self.adapter.block(task.block, s.scratch_views, st.hidden_plus, st.inputs)
        perturb_into(s.scratch, weights, s.z, -self.config.eps)
        st.hidden_minus = self.adapter.block(task.block, s.scratch_views, st.hidden_minus, st.inputs)

    def _eval(self, task: Task) -> None:
        st, s = self._current(), self.storage
        assert task.block is not None and st.inputs is not None and st.hidden_plus is not None
        params = self._unperturbed(self._block_update(task), s.scratch, s.block_layout)
        st.hidden_plus = self.adapter.block(task.block, params, st.hidden_plus, st.inputs)

    def _update(self, task: Task) -> None:
        if task.block is None:
            self._group_update()
        else:
            self._block_update(task)
