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
FixedDepth(1), FixedDepth(2) and MemoryBudget (and ``--offload-every`` and ``--policy`` rows, and
with ``--planned GB`` the plan ``zoruntime plan`` finds within GB, its prediction from this card
printed beside it),
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
import math
import statistics
import sys
import time
from dataclasses import replace
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel

from ..device.measure import DeviceMeter
from ..engine import Runtime, run
from ..models.adapter import adapter_for
from ..models.init import TINY_CONFIGS, copy_to, materialize_flat, meta_model
from ..models.shapes import MODEL_NAMES, named_config, shape_dims
from ..planning.directions import fewest_directions
from ..planning.planner import Prediction, Workload, best, profile_from_card
from ..policies.base import UNIT_KINDS, FixedDepth, MemoryBudget, Plan, Policy
from ..storage import model_layout
from ..tracing.recorder import Timeline
from ..train.model import available_bytes
from ..train.options import UsageError, parse_fit, parse_policy
from ..zo.config import ZOSGD
from ..zo.estimator import ESTIMATORS
from ..zo.mezo import MeZOBaseline
from .card import card

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
        "issue_ms": None if summary.issue_seconds is None else summary.issue_seconds * 1e3,
        "issue_to_start_ms": None if summary.issue_to_start_seconds is None else summary.issue_to_start_seconds * 1e3,
        "started_on_issue": summary.started_on_issue,
        "largest_gaps": [
            {"step": g.step, "ms": g.seconds * 1e3, "before": g.task, "waiting_for": g.waiting_for}
            for g in summary.largest_gaps
        ],
    }


def host_bytes(config: Any, dtype: torch.dtype, alias: bool) -> int:
    """Host memory the bench's weights take: every group, or with ``alias`` the ends and one block."""
    layout = model_layout(adapter_for(meta_model(config, dtype)), dtype)
    kept = sum(g.nbytes for g in layout.groups if not g.streamable)
    blocks = sum(g.nbytes for g in layout.streamable)
    return kept + (blocks // layout.num_units if alias else blocks)


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
                        help="also run these policies, as zoruntime train takes them (depth=1,offload=4,unit=linear; "
                        "fit=24GB: as --planned 24); "
                        "their unit must be --unit's")  # fmt: skip
    parser.add_argument("--planned", type=float, nargs="*", default=[], metavar="GB",
                        help="also run the plan zoruntime plan finds within GB of GPU memory for --unit, each GB; "
                        "its prediction from this run's own card is printed beside it")  # fmt: skip
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
    if args.budget_gb is not None and not 0 < args.budget_gb < math.inf:
        parser.error(f"--budget-gb must be a size > 0 (the MemoryBudget row's, in GiB), got {args.budget_gb}")
    if any(not 0 < gigabytes < math.inf for gigabytes in args.planned):
        parser.error(f"--planned takes sizes > 0 in GB, got {' '.join(f'{g:g}' for g in args.planned)}")

    try:
        fits = [text for text in args.policy if parse_fit(text) is not None]  # fit=SIZE: as --planned
        args.planned += [(parse_fit(text) or 0) / 1e9 for text in fits]
        extra: list[tuple[str, Policy | None]] = [
            (text, parse_policy(text)) for text in args.policy if text not in fits
        ]
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
    need, free = host_bytes(config, dtype, args.alias), available_bytes("cpu")
    if free is not None and need > 0.9 * free:
        alias = (
            ""
            if args.alias
            else f"; --alias shares one block's buffer among all ({host_bytes(config, dtype, True) / 1e9:.1f} GB)"
        )
        parser.error(f"--model {args.model}'s weights take {need / 1e9:.1f} GB of host memory and {free / 1e9:.1f} GB "
                     f"is free{alias}")  # fmt: skip
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

    work = Workload(layout, shape_dims(config), args.batch, args.seq, args.unit, config.num_hidden_layers)
    blocks_work = replace(work, layout=model_layout(adapter_for(model), dtype), unit="block")  # what the card timed
    profile = profile_from_card(dev.describe(), facts, blocks_work, dev.total_bytes() / 1e9,
                                duplex=min(1.0, facts["duplex"]),
                                source=f"zoruntime bench --model {args.model} on {dev.describe()}; {versions}; "
                                "duplex timed by the card (a block up and one down at once)")  # fmt: skip
    if args.save_profile:
        print(f"  profile written to {profile.save(args.save_profile)}")
    free = dev.free_bytes()
    if args.budget_gb is not None:
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
    predicted: dict[str, Prediction] = {}
    for gigabytes in args.planned:
        found = best(work, profile, int(gigabytes * 1e9))
        if found is None:
            print(f"  nothing the planner knows fits in {gigabytes:g} GB with {args.unit} units")
            continue
        name = f"planned, {gigabytes:g} GB: {found.policy}"
        predicted[name] = found
        runners.append((name, found.chosen))
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
        if name in predicted:  # the planner's figures for it, from this card
            plan = predicted[name]
            row.update(predicted_step_s=plan.step_s, predicted_gpu_mb=plan.gpu_bytes / 2**20,
                       predicted_bound_by=plan.bound_by)  # fmt: skip
            print(f"{'':<4}predicted from this card: {plan.step_s:.3f} s a step, {plan.gpu_bytes / 2**20:,.0f} MB, "
                  f"paced by {plan.bound_by}")  # fmt: skip
    traced = trace(model, dev, batch, args.trace_steps, args.trace_out) if args.trace_out else None
    print(json.dumps({
        "model": args.model, "dtype": args.dtype, "batch": args.batch, "seq": args.seq, "alias": args.alias,
        "device": dev.describe(), "versions": versions, "init_s": init_s, "card": facts, "rows": rows,
        "trace": traced,
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
