"""``zoruntime bench``: offloaded ZO-SGD throughput against MeZO on the GPU and the transfer floor.

First a card: block bytes, measured pinned upload and offload GB/s for one block, the device
time of both perturbed forwards and of the whole compute task of one block, the host's time to
enqueue that task (and, with ``--unit half|linear``, the block's unit tasks), one probe's head
on the device and the host's time to issue it, a block's upload and offload at once, and two
floors as tokens/s: the
upload-only floor = blocks × max(upload, compute task), and the floor when every block is also
written back every step = blocks × max(both at once, compute task) (see ``card``); ratios are to
the upload-only floor. Then one row per runner, when the whole model fits on the GPU: "MeZO (after the
paper)", MeZO as its users run it (``zo.mezo``: all weights on the GPU, in-place perturbation,
one z per tensor from a reseeded generator), and "zoruntime, all resident" (this runtime with
every block on the GPU, no transfers); then the offloaded runtime under FixedDepth(0),
FixedDepth(1), FixedDepth(2) and MemoryBudget (and ``--offload-every`` and ``--policy`` rows),
each streaming ``--unit``s (whole blocks, halves, or a unit per linear layer). Columns:
tokens/s, step seconds, peak allocated MB, device memory used MB (as nvidia-smi counts it),
ratio to the floor and to MeZO. The last line is one JSON document.

Weights are random, written straight into (pinned) host buffers; ``--alias`` makes every block
share one buffer so 66B and 175B shapes run with little host memory (the timing and GPU memory
are real, the weights are not). ``--device cpu`` runs the same code on the CPU (a smoke test;
the figures mean little there), by default on the tiny model with 128-token sequences.

    python -m zoruntime.bench.throughput --model opt-1.3b            # defaults: batch 1, seq 2048, fp16
    python -m zoruntime.bench.throughput --device cpu                # tiny, batch 1, seq 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from functools import partial
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel

from ..device.graphs import CUDAGraphs
from ..device.measure import DeviceMeter
from ..engine import Runtime, run
from ..models import fused_loss
from ..models.adapter import adapter_for
from ..models.groups import existing_flat
from ..models.init import TINY_CONFIGS, copy_to, materialize_flat
from ..models.shapes import MODEL_NAMES, named_config, shape_dims
from ..planning.cost import OpFigures
from ..planning.directions import fewest_directions
from ..planning.memory import loss_pieces
from ..planning.planner import Workload, profile_from_card
from ..policies.base import UNIT_KINDS, FixedDepth, MemoryBudget, Plan, Policy
from ..storage import model_layout
from ..tracing.recorder import Timeline
from ..train.options import UsageError, parse_policy
from ..zo.config import ZOSGD
from ..zo.directions import DirectionSampler
from ..zo.estimator import ESTIMATORS
from ..zo.mezo import MeZOBaseline
from ..zo.update import PendingUpdate, draw_direction, perturb_into, update_group

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_MODEL = {"cuda": "opt-1.3b", "cpu": "tiny"}  # a CPU run is a smoke test: seconds, not hours
DEFAULT_SEQ = {"cuda": 2048, "cpu": 128}
OPTIMIZER = ZOSGD(lr=1e-7, eps=1e-3)
"""What every runner steps with: a learning rate that barely moves the weights (timing, not learning)."""


def budget_name(budget: int, named: str = "") -> str:
    """``MemoryBudget(39.00 GB)``, or in MB below 1 GB (a CPU smoke run's budget is a few hundred kB)."""
    size = f"{budget / 2**30:.2f} GB" if budget >= 2**30 else f"{budget / 2**20:.2f} MB"
    return f"MemoryBudget({size}{named})"


def link_line(cuda: bool, facts: dict[str, Any]) -> str:
    """The card's transfer figures: over the bus from pinned memory on CUDA, plain copies on a CPU."""
    up = f"{facts['upload_ms']:.2f} ms ({facts['upload_gb_s']:.1f} GB/s)"
    down = f"{facts['offload_ms']:.2f} ms ({facts['offload_gb_s']:.1f} GB/s)"
    if cuda:
        return f"upload (pinned) {up}, offload {down}"
    return f"copy to the compute buffer {up}, copy back {down}"


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

    block = adapter.bound_block(first.index, params)  # as the runtime runs a block's perturbed copies

    def dual_forward() -> None:
        with torch.no_grad():
            block(hidden, inputs)
            block(hidden, inputs)

    def compute_task(directions: int = 1) -> None:
        with torch.no_grad():
            update_group(slot, pending, layout, sampler, z)
            for direction in range(directions):
                draw_direction(sampler, 2, layout, z, direction=direction)
                for eps in (1e-3, -1e-3):
                    perturb_into(scratch, slot, z, eps)
                    block(hidden, inputs)

    perturb_into(scratch, slot, sampler.draw(2, first.group, z), 1e-3)
    forward = dev.seconds(dual_forward, repeat=10)
    task = dev.seconds(compute_task, repeat=10)
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
        "compute_enqueue_ms": enqueue * 1e3,  # host time to issue it; above the larger of the two: host-bound
        "host_task_ms": (enqueue - 2 * host_probe) * 1e3,  # that time as a cost per task
        "host_probe_ms": host_probe * 1e3,  # and one per probe (from a task of two directions)
        "host_parts_ms": host_parts,  # the host's time to issue each part alone: a task is an update and,
        # a probe, a draw, a perturbed copy and a forward; a streamed block is also an upload (and an offload)
        "head_ms": head * 1e3,  # one probe's loss in the head, on the device
        "head_enqueue_ms": head_enqueue * 1e3,  # and the host's time to issue it
        "host_piece_ms": head_enqueue * 1e3 / pieces,  # that time per piece of the loss, as profiles take it
        **cut,  # with --unit half or linear: the host's time for the block's unit tasks
        "both_directions_ms": both * 1e3,  # one upload and one offload of a block at once
        "duplex": max(up, down) / both,  # the fraction of its speed each direction keeps while both run
        "floor_step_s": floor,
        "floor_tokens_s": batch * seq / floor,
        "duplex_floor_step_s": duplex_floor,
        "duplex_floor_tokens_s": batch * seq / duplex_floor,
        "bound_by": "upload" if up >= task else "compute",
    }


def measure(
    model: torch.nn.Module,
    policy: Policy,
    dev: DeviceMeter,
    batch: dict[str, torch.Tensor],
    steps: int,
    optimizer: ZOSGD = OPTIMIZER,
    cuda_graphs: bool = False,
) -> dict[str, Any]:
    """Median step time over ``steps`` steps after one warm-up step (with ``offload_every=k``: the
    mean over whole cycles of k steps, each holding one write-back; with ``cuda_graphs``, after
    two, the second capturing); a runner that fails (out of memory, say) gives a row with its
    error instead of ending the benchmark."""
    cycle = getattr(policy, "offload_every", 1)
    steps = -(-steps // cycle) * cycle

    async def go() -> tuple[list[float], float | None]:
        times = []
        async with Runtime(model, optimizer, device=dev.device, policy=policy, cuda_graphs=cuda_graphs) as rt:
            for _ in range(2 if cuda_graphs else 1):
                await rt.step(batch)  # warm up: allocator, kernels, pinned pages (and capture the graphs)
            dev.reset_peak()
            for _ in range(steps):
                t0 = time.perf_counter()
                await rt.step(batch)
                times.append(time.perf_counter() - t0)
            used = dev.used_mb()
        return times, used

    dev.release()  # the previous runner's buffers
    try:
        times, used = run(go())
    except (MemoryError, torch.OutOfMemoryError, RuntimeError, ValueError) as error:
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
    step_s = statistics.median(times) if cycle == 1 else statistics.fmean(times)
    tokens = batch["input_ids"].numel()
    return {
        "step_s": step_s, "tokens_s": tokens / step_s, "peak_allocated_mb": dev.peak_mb(), "used_mb": used,
        "step_times_s": times, "directions": optimizer.directions,
        "estimator": optimizer.estimator,
    }  # fmt: skip


def measure_mezo(
    model: PreTrainedModel, dev: DeviceMeter, batch: dict[str, torch.Tensor], steps: int
) -> dict[str, Any]:
    """MeZO as its users run it (``zo.mezo``): a copy of the model on the device, median step time
    after one warm-up step, as ``measure``."""
    dev.release()
    copy: torch.nn.Module | None = None
    try:
        copy = copy_to(model, dev.device)
        on_device = {k: v.to(dev.device) for k, v in batch.items()}
        on_device["labels"] = on_device["input_ids"]
        baseline = MeZOBaseline(copy, lr=1e-7, eps=1e-3)
        baseline.step(on_device)
        dev.reset_peak()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            baseline.step(on_device)  # reads both losses on the host, so the step has finished
            times.append(time.perf_counter() - t0)
        used = dev.used_mb()
    except (torch.OutOfMemoryError, RuntimeError) as error:
        return {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
    finally:
        del copy
        dev.release()
    step_s = statistics.median(times)
    return {
        "step_s": step_s, "tokens_s": batch["input_ids"].numel() / step_s, "peak_allocated_mb": dev.peak_mb(),
        "used_mb": used, "step_times_s": times,
    }  # fmt: skip


def trace(
    model: torch.nn.Module, dev: DeviceMeter, batch: dict[str, torch.Tensor], steps: int, prefix: str
) -> dict[str, Any]:
    """A few traced steps under FixedDepth(1) after a warm-up step: ``PREFIX.png``, ``PREFIX.json``
    (Chrome trace) and the summary's figures."""

    dev.release()

    async def go() -> Timeline:
        async with Runtime(model, OPTIMIZER, device=dev.device, policy=FixedDepth(1), trace=True) as rt:
            for _ in range(steps + 1):
                await rt.step(batch)
        return rt.timeline.training_steps_from(1)  # after close: the last step's offloads are in

    timeline = run(go())
    png = timeline.save_png(f"{prefix}.png", (1800, 420))
    chrome = timeline.save_chrome_trace(f"{prefix}.json")
    summary = timeline.summary(show=True)
    return {
        "png": str(png),
        "chrome_trace": str(chrome),
        "steps": summary.steps,
        "step_s": summary.step_seconds,
        "lane_busy": summary.lane_busy,
        "upload_gb_s": summary.upload_gb_s,
        "offload_gb_s": summary.offload_gb_s,
        "overlap_efficiency": summary.overlap_efficiency,
        "largest_gaps": [
            {"step": g.step, "ms": g.seconds * 1e3, "before": g.task, "waiting_for": g.waiting_for}
            for g in summary.largest_gaps
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="zoruntime bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        default=None,
        help=f"a shape by name: {', '.join(MODEL_NAMES + tuple(TINY_CONFIGS))} (default: opt-1.3b on cuda, tiny "
        "on cpu)",
    )
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--seq", type=int, default=None,
                        help="tokens per sequence (default: 2048 on cuda, 128 on cpu)")  # fmt: skip
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="weights and compute (default fp16)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per runner, median reported (default 5)")
    parser.add_argument("--alias", action="store_true", help="all blocks share one host buffer (66B/175B shapes)")
    parser.add_argument("--budget-gb", type=float, default=None, help="MemoryBudget size (default: half the free GPU)")
    parser.add_argument("--skip-mezo", action="store_true", help="do not run the all-on-GPU baseline")
    parser.add_argument("--trace-out", default=None, metavar="PREFIX",
                        help="trace a few FixedDepth(1) steps too: PREFIX.png, PREFIX.json")  # fmt: skip
    parser.add_argument("--trace-steps", type=int, default=3, help="traced steps after one warm-up (default 3)")
    parser.add_argument("--save-profile", default=None, metavar="FILE",
                        help="write the card as a GPU profile for zoruntime plan --gpu FILE")  # fmt: skip
    parser.add_argument("--offload-every", type=int, nargs="*", default=[], metavar="K",
                        help="also run FixedDepth(1, offload_every=K) for each K (timed over full cycles)")  # fmt: skip
    parser.add_argument("--unit", choices=UNIT_KINDS, default="block",
                        help="how runners stream a block: whole (default), halves, a unit per linear")  # fmt: skip
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="also run FixedDepth(1) (and all resident) with whole blocks replayed from CUDA graphs",
    )
    parser.add_argument("--policy", nargs="*", default=[], metavar="P",
                        help="also run these policies, as zoruntime train takes them (depth=1,offload=4,unit=linear); "
                        "their unit must be --unit's")  # fmt: skip
    parser.add_argument("--directions", type=int, nargs="*", default=[], metavar="Q",
                        help="also run FixedDepth(1) with Q directions a step, for each Q (--estimator's)")  # fmt: skip
    parser.add_argument("--estimator", choices=ESTIMATORS, default="two-sided", help="for --directions (default "
                        "two-sided)")  # fmt: skip
    args = parser.parse_args(argv)
    if any(q < fewest_directions(args.estimator) for q in args.directions):
        parser.error(f"--directions takes numbers >= {fewest_directions(args.estimator)} with --estimator "
                     f"{args.estimator}")  # fmt: skip
    try:
        kind = torch.device(args.device).type
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a device; use cuda or cpu")
    if kind not in DEFAULT_MODEL:
        parser.error(f"--device {args.device!r} is not supported; use cuda or cpu")
    if args.cuda_graphs and kind != "cuda":
        parser.error("--cuda-graphs replays CUDA graphs: it needs --device cuda")
    args.model = args.model if args.model is not None else DEFAULT_MODEL[kind]
    args.seq = args.seq if args.seq is not None else DEFAULT_SEQ[kind]
    counts = (args.batch, args.seq, args.steps, args.trace_steps, *args.offload_every)
    if min(counts) <= 0:
        parser.error("--batch, --seq, --steps, --trace-steps and --offload-every must be positive")

    try:
        extra: list[tuple[str, Policy | None]] = [(text, parse_policy(text)) for text in args.policy]
    except UsageError as error:
        parser.error(str(error))
    for text, asked in extra:
        if getattr(asked, "unit", "block") != args.unit:
            parser.error(f"--policy {text}: its unit differs from --unit {args.unit} (the model is laid out once)")

    dev = DeviceMeter(args.device)
    dtype = DTYPES[args.dtype]
    if args.model in TINY_CONFIGS:
        config = TINY_CONFIGS[args.model](max_position_embeddings=args.seq)
    else:
        try:
            config = named_config(args.model)
        except ValueError as error:
            parser.error(str(error))
    if args.seq > config.max_position_embeddings:
        parser.error(f"--seq {args.seq} is longer than {args.model}'s {config.max_position_embeddings} positions")
    t0 = time.perf_counter()
    fill_device = dev.device if dev.cuda else None  # a GPU draws the random weights ~100x faster than a CPU
    model = materialize_flat(config, dev.host_buffer, dtype=dtype, alias_blocks=args.alias, fill_device=fill_device,
                             unit=args.unit)  # fmt: skip
    dev.release()
    init_s = time.perf_counter() - t0
    ids = torch.randint(4, config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids}
    layout = model_layout(adapter_for(model, args.unit), dtype)  # the runners' units
    block_bytes, blocks = layout.unit_bytes, layout.num_units

    facts = card(model, dev, args.batch, args.seq, dtype, args.unit)
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, Python {sys.version.split()[0]}"
    print(
        f"zoruntime bench: {args.model} {args.dtype}, batch {args.batch} x {args.seq}, on {dev.describe()}; {versions}"
    )
    print(f"  init {init_s:.1f} s{' (alias mode: blocks share one host buffer)' if args.alias else ''}")
    block_mb = f"{facts['block_mb']:.0f}" if facts["block_mb"] >= 10 else f"{facts['block_mb']:.2f}"
    cut = f" (streamed as {blocks} {args.unit} units)" if args.unit != "block" else ""
    print(f"  {config.num_hidden_layers} blocks of {block_mb} MB{cut}; {link_line(dev.cuda, facts)}")
    print(f"  both forwards of a block {facts['dual_forward_ms']:.2f} ms, whole compute task "
          f"{facts['compute_task_ms']:.2f} ms (the host enqueues it in {facts['compute_enqueue_ms']:.2f} ms: "
          f"{facts['host_task_ms']:.2f} ms per task + {facts['host_probe_ms']:.2f} ms per probe); "
          f"floor {facts['floor_step_s']:.3f} s/step "
          f"= {facts['floor_tokens_s']:,.0f} tokens/s ({facts['bound_by']}-bound)")  # fmt: skip
    print("  the host's time to issue each part alone: "
          + ", ".join(f"{name} {ms:.3f} ms" for name, ms in facts["host_parts_ms"].items()))  # fmt: skip
    print(f"  a block up and one down at once {facts['both_directions_ms']:.2f} ms (each direction keeps "
          f"{facts['duplex']:.2f} of its speed); floor writing every block back every step "
          f"{facts['duplex_floor_step_s']:.3f} s/step = {facts['duplex_floor_tokens_s']:,.0f} tokens/s; "
          "ratios below are to the upload-only floor")  # fmt: skip
    print(f"  the head's loss for one probe {facts['head_ms']:.2f} ms (the host issues it in "
          f"{facts['head_enqueue_ms']:.2f} ms: {facts['host_piece_ms']:.3f} ms per piece)")  # fmt: skip
    if "unit_tasks_enqueue_ms" in facts:
        print(
            f"  the block cut into {facts['units_per_block']} {facts['unit']} units: the host issues their tasks "
            f"in {facts['unit_tasks_enqueue_ms']:.2f} ms (the whole block's: {facts['compute_enqueue_ms']:.2f})"
        )

    if args.save_profile:
        work = Workload(layout, shape_dims(config), args.batch, args.seq)
        gpu_gb = dev.total_bytes() / 1e9
        profile = profile_from_card(dev.describe(), facts, work, gpu_gb, duplex=min(1.0, facts["duplex"]),
                                    source=f"zoruntime bench --model {args.model} on {dev.describe()}; {versions}; "
                                    "duplex timed by the card (a block up and one down at once)")  # fmt: skip
        print(f"  profile written to {profile.save(args.save_profile)}")
    free = dev.free_bytes()
    if args.budget_gb:
        budget = int(args.budget_gb * 2**30)
    else:  # half the free GPU memory; on a CPU, room for half the blocks beside the slots
        budget = free // 2 if free is not None else (blocks // 2 + 5) * block_bytes
    runners: list[tuple[str, Policy | None]] = []
    everything = layout.bytes_needed(Plan(0, frozenset(range(blocks))))  # every block resident
    if not args.skip_mezo and not args.alias and (free is None or everything < 0.8 * free):
        runners.append(("MeZO (after the paper)", None))  # all on the GPU, in place: what users run
        runners.append(("zoruntime, all resident", MemoryBudget(10 * everything)))
    unit, named = args.unit, ("" if args.unit == "block" else f", unit={args.unit!r}")
    runners += [(f"FixedDepth({k}{named})", FixedDepth(k, unit=unit)) for k in (0, 1, 2)]
    runners.append((budget_name(budget, named), MemoryBudget(budget, unit=unit)))
    runners += [(f"FixedDepth(1, offload_every={k}{named})", FixedDepth(1, k, unit)) for k in args.offload_every]
    runners += extra
    several = {f"FixedDepth(1{named}), q={q} {args.estimator}": replace(OPTIMIZER, directions=q,
                                                                        estimator=args.estimator)
               for q in args.directions}  # fmt: skip
    runners += [(name, FixedDepth(1, unit=unit)) for name in several]  # each measured with its optimizer
    graphed = {
        f"{name}, CUDA graphs": policy
        for name, policy in runners
        if args.cuda_graphs and unit == "block" and name in ("FixedDepth(1)", "zoruntime, all resident")
    }
    runners += list(graphed.items())  # fmt: skip

    print(f"\n{'runner':<32}{'tokens/s':>11}{'step s':>9}{'peak MB':>10}{'used MB':>10}{'x floor':>9}{'x MeZO':>8}")
    rows: list[dict[str, Any]] = []
    for name, policy in runners:
        timed = (
            measure_mezo(model, dev, batch, args.steps)
            if policy is None
            else measure(model, policy, dev, batch, args.steps, several.get(name, OPTIMIZER), name in graphed)
        )
        row = {"runner": name, **timed}
        rows.append(row)
        mezo = rows[0].get("tokens_s") if rows[0]["runner"].startswith("MeZO") else None
        if "error" in row:
            print(f"{name:<32} failed: {row['error']}", flush=True)
            continue
        row["x_floor"] = row["tokens_s"] / facts["floor_tokens_s"]
        row["x_mezo"] = row["tokens_s"] / mezo if mezo else None
        x_mezo = f"{row['x_mezo']:.2f}" if mezo else "-"
        peak, used = (f"{v:,.0f}" if v is not None else "-" for v in (row["peak_allocated_mb"], row["used_mb"]))
        print(f"{name:<32}{row['tokens_s']:>11,.0f}{row['step_s']:>9.3f}{peak:>10}{used:>10}"
              f"{row['x_floor']:>9.2f}{x_mezo:>8}", flush=True)  # fmt: skip
    traced = trace(model, dev, batch, args.trace_steps, args.trace_out) if args.trace_out else None
    print(json.dumps({
        "model": args.model, "dtype": args.dtype, "batch": args.batch, "seq": args.seq, "alias": args.alias,
        "device": dev.describe(), "versions": versions, "init_s": init_s, "card": facts, "rows": rows,
        "trace": traced,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
