"""The bench's card: one block's figures on this device, the ones a profile and the upload-only
floor are made of: its upload, offload and both at once, both forwards and the whole compute
task on the device, the host's time to issue the task (split per task and per probe, and each
part alone), the head's loss for one probe, and with finer units the host's time for a block's
unit tasks. Knows the bench's device meter and a model's adapter; nothing of runners or tables.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from ..device.graphs import CUDAGraphs
from ..device.measure import DeviceMeter
from ..models import fused_loss
from ..models.adapter import adapter_for
from ..models.groups import existing_flat
from ..planning.cost import OpFigures
from ..planning.memory import loss_pieces
from ..zo.config import ZOSGD
from ..zo.directions import DirectionSampler
from ..zo.update import PendingUpdate, draw_direction, perturb_into, update_group


def unit_tasks_enqueue(
    model: torch.nn.Module, dev: DeviceMeter, hidden: torch.Tensor, inputs: Any, unit: str, pending: PendingUpdate
) -> tuple[float, int]:
    """Host seconds to issue the compute tasks of the first block streamed as ``unit`` units (each
    unit's update, draw, two perturbed copies and its part of both forwards, paused between units
    as the runtime runs them), and how many units that is: what cutting a block costs the host,
    beside the whole block's ``compute_enqueue_ms``."""
    adapter = adapter_for(model, unit)
    layouts = [adapter.groups()[u.group][0] for u in adapter.units.streamable if u.index == 0]
    slots = [torch.zeros(lay.numel, dtype=lay.dtype, device=dev.device) for lay in layouts]
    scratch, z = [torch.empty_like(s) for s in slots], [torch.empty_like(s) for s in slots]
    start = adapter.segmented_block(0, {k: v for lay, b in zip(layouts, scratch, strict=True)
                                        for k, v in lay.views(b).items()})  # fmt: skip
    sampler = DirectionSampler(dev.device)

    def tasks() -> None:
        with torch.no_grad():
            runs = [start(hidden, inputs), start(hidden, inputs)]  # the +eps and -eps probes
            for lay, slot, copy, direction in zip(layouts, slots, scratch, z, strict=True):
                update_group(slot, pending, lay, sampler, direction)
                draw_direction(sampler, 2, lay, direction)
                for run, eps in zip(runs, (1e-3, -1e-3), strict=True):
                    perturb_into(copy, slot, direction, eps)
                    run.resume()

    return dev.enqueue_seconds(tasks, repeat=5), len(layouts)


def card(
    model: torch.nn.Module, dev: DeviceMeter, batch: int, seq: int, dtype: torch.dtype, unit: str = "block"
) -> dict[str, Any]:
    """Measured link speeds and per-block compute time, and the floor they imply.

    The floor is the upload-only floor (``OpFigures.upload_floor``): blocks × max(upload, compute task), where the
    compute task is everything the compute lane does for a block (draw the pending update's z,
    apply it, draw this step's z, two perturbed copies and two forwards), timed on the device
    alone. Offloads need not happen every step, so they are measured and shown but do not set
    the floor. The host's time to enqueue a compute task is shown beside it (and split into a
    cost per task and one per probe, from a task of two directions, as profiles model it): where
    it is the largest, Python, not the GPU or the link, sets the pace.
    """
    adapter = adapter_for(model)
    first = adapter.units.streamable[0]
    layout, block_params = adapter.groups()[first.group]
    host = existing_flat(layout, block_params)  # the model's own (pinned) first block
    if host is None:
        host = dev.host_buffer(layout.numel, layout.dtype)
    slot = torch.empty(layout.numel, dtype=layout.dtype, device=dev.device)
    up = dev.seconds(lambda: slot.copy_(host, non_blocking=True), repeat=10)
    down = dev.seconds(lambda: host.copy_(slot, non_blocking=True), repeat=10)
    host_other, slot_other = dev.host_buffer(layout.numel, layout.dtype), torch.empty_like(slot)  # share only the link
    both = dev.seconds(dev.at_once([lambda: slot.copy_(host, non_blocking=True),
                                    lambda: host_other.copy_(slot_other, non_blocking=True)]), repeat=10)  # fmt: skip
    shape: Any = getattr(model, "config")  # noqa: B009 (a HF config; nn.Module's type says nothing of it)
    ids = torch.randint(4, shape.vocab_size, (batch, seq))
    inputs = adapter.prepare(adapter.validate({"input_ids": ids}), dev.device, dtype)
    embed = adapter.units.units[0]  # the embed stage, run once: real hidden states, and what a family
    ends = {k: p.detach().to(dev.device) for k, p in adapter.groups()[embed.group][1].items()}  # computes there
    with torch.no_grad():
        hidden = adapter.embed(ends, inputs)  # (rotary embeddings) for every block
        head_loss = partial(adapter.head_loss, ends, hidden, inputs.batch)  # one probe's, on unperturbed rows
        head = dev.seconds(head_loss, repeat=3)
        head_enqueue = dev.enqueue_seconds(head_loss, repeat=3)
    head_rows = ends[min(adapter.vocab_names)]  # the head's rows (or the tied embedding's: the same shape)
    fused_itemsize = hidden.element_size() if fused_loss.usable(hidden) else 0  # the loss kernel's pieces
    pieces = loss_pieces(head_rows.shape[0], head_rows.shape[1], batch * seq, fused_itemsize)
    del ends, head_rows
    scratch, z = torch.empty_like(slot), torch.empty_like(slot)
    params, sampler = layout.views(scratch), DirectionSampler(slot.device)
    rounding = ZOSGD().rounding_for(layout.dtype)  # as the runtime updates these masters by default
    pending = PendingUpdate.from_gradient(0, 1, 0.0, 0.0, torch.zeros((), device=dev.device), rounding)  # lr 0

    layer = adapter.bound_layer(first.index, params)  # as the runtime runs a block's perturbed copies
    block = lambda hidden, inputs: layer(hidden, adapter.layer_inputs(first.index, inputs))  # noqa: E731

    def dual_forward() -> None:
        with torch.no_grad():
            block(hidden, inputs)
            block(hidden, inputs)

    def compute_task(directions: int = 1, forwards: bool = True) -> None:
        with torch.no_grad():
            update_group(slot, pending, layout, sampler, z)
            for direction in range(directions):
                draw_direction(sampler, 2, layout, z, direction=direction)
                for eps in (1e-3, -1e-3):
                    perturb_into(scratch, slot, z, eps)
                    if forwards:
                        block(hidden, inputs)

    perturb_into(scratch, slot, sampler.draw(2, first.group, z), 1e-3)
    forward = dev.seconds(dual_forward, repeat=10)
    task = dev.seconds(compute_task, repeat=10)
    rest = dev.seconds(lambda: compute_task(forwards=False), repeat=10)  # timed whole: never a difference of two
    enqueue = dev.enqueue_seconds(compute_task, repeat=10)
    enqueue_two = dev.enqueue_seconds(lambda: compute_task(2), repeat=10)  # 4 probes: the host's cost per probe
    host_probe = min(max(enqueue_two - enqueue, 0.0), enqueue) / 2  # the split always adds up to `enqueue`
    with torch.no_grad():  # where a task's host time goes, each part issued alone
        parts = {
            "update": lambda: update_group(slot, pending, layout, sampler, z),
            "draw": lambda: draw_direction(sampler, 2, layout, z),
            "perturb": lambda: perturb_into(scratch, slot, z, 1e-3),
            "forward": lambda: block(hidden, inputs),
            "upload": lambda: slot.copy_(host, non_blocking=True),
        }
        if dev.cuda:  # the forward replayed from a CUDA graph, as Runtime(cuda_graphs=True) runs it
            graphs, layer = CUDAGraphs(dev.device), adapter.bound_layer(first.index, params)
            kwargs = adapter.layer_inputs(first.index, inputs)
            for _ in range(2):  # eagerly, then captured
                graphs.forward("block", 0, layer, hidden, kwargs)
            parts["graphed forward"] = lambda: graphs.forward("block", 0, layer, hidden, kwargs)
        host_parts = {name: dev.enqueue_seconds(part, repeat=10) * 1e3 for name, part in parts.items()}
    cut = {}
    if unit != "block":  # the same block's tasks as the runtime issues them for finer units
        unit_enqueue, units = unit_tasks_enqueue(model, dev, hidden, inputs, unit, pending)
        cut = {"unit": unit, "units_per_block": units, "unit_tasks_enqueue_ms": unit_enqueue * 1e3}
    blocks = len(adapter.units.streamable)
    floor = OpFigures(upload_s=up, compute_s=task, offload_s=down).upload_floor(blocks)
    # every block up and down each step, the two copies at once: never below either copy alone (a
    # measured `both` under one is noise, as on a CPU, where the copies take microseconds)
    duplex_floor = blocks * max(both, up, down, task)
    return {
        "block_mb": layout.nbytes / 2**20,
        "upload_ms": up * 1e3,
        "offload_ms": down * 1e3,
        "upload_gb_s": layout.nbytes / up / 1e9,
        "offload_gb_s": layout.nbytes / down / 1e9,
        "dual_forward_ms": forward * 1e3,
        "compute_task_ms": task * 1e3,
        "compute_rest_ms": rest * 1e3,  # the task without its forwards: draws, perturbed copies, the update
        "compute_enqueue_ms": enqueue * 1e3,  # host time to issue it; above the larger of the two: host-bound
        "host_task_ms": (enqueue - 2 * host_probe) * 1e3,  # that time as a cost per task
        "host_probe_ms": host_probe * 1e3,  # and one per probe (from a task of two directions)
        "host_parts_ms": host_parts,  # the host's time to issue each part alone: a task is an update and,
        # a probe, a draw, a perturbed copy and a forward; a streamed block is also an upload (and an offload)
        "head_ms": head * 1e3,  # one probe's loss in the head, on the device
        "head_enqueue_ms": head_enqueue * 1e3,  # and the host's time to issue it
        "host_piece_ms": head_enqueue * 1e3 / pieces,  # that time per piece of the loss, as profiles take it
        **cut,  # with --unit half or linear: the host's time for the block's unit tasks
        "blas_workspace_mib": dev.blas_workspace_bytes(dtype) / 2**20,  # cuBLAS's, on each stream that runs matmuls
        "both_directions_ms": both * 1e3,  # one upload and one offload of a block at once
        "duplex": max(up, down) / both,  # the fraction of its speed each direction keeps while both run
        "floor_step_s": floor,
        "floor_tokens_s": batch * seq / floor,
        "duplex_floor_step_s": duplex_floor,
        "duplex_floor_tokens_s": batch * seq / duplex_floor,
        "bound_by": "upload" if up >= task else "compute",
    }
