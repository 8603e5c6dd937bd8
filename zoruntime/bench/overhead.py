"""Scheduler overhead and CPU-backend cost, printed as a table; the last line is one JSON document.

1. Scheduler overhead per task: a 96-block step graph (Algorithm 1, 290 tasks) on lanes that
   do no work at all, under asyncio's loop and uvloop, with tracing off and on: lanes that
   complete at once (the scheduler alone), lanes that each hand their task to one worker thread
   (a trip through the event loop a task), and the whole pass handed to that thread in one trip
   (CUDA's path).
2. Host time per unit compute task: a unit's whole compute task on blocks too small for their
   kernels to matter, in microseconds, at 1, 2, 4 and 8 directions and for each unit kind, fitted
   as a cost per task plus one per probe (on a GPU this sets the pace of small units).
3. Operations the host dispatches at a real model's shape: for one block's compute task (16-bit
   masters, stochastic rounding, weight decay), the pending update and each probe's draw,
   perturbed copy and forward; for the head, each probe's loss over 2,048 tokens. Each is a
   call into PyTorch (most a kernel launch on a GPU), so this counts the host's work where a GPU
   sets no pace; it is the same on any machine.
4. The CPU backend's step time over ReferenceZO's on a small random-init OPT (fp32).

    python -m zoruntime.bench.overhead [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from typing import Any, ClassVar, TypeVar
from unittest.mock import patch

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .. import engine
from ..models import adapter_for, fused_loss
from ..models.batch import map_tensors
from ..models.init import meta_model, random_opt, tiny_opt_config
from ..models.shapes import opt_config
from ..policies.base import UNIT_KINDS, FixedDepth, Plan
from ..runtime.graph import Lane, Task, step_graph
from ..runtime.instruments import Instruments
from ..runtime.scheduler import Completion, Enqueuer, LaneRunner, Scheduler, Work
from ..runtime.units import uniform_units
from ..tracing.recorder import TimelineRecorder
from ..zo import fused
from ..zo import update as update_module
from ..zo.config import ZOSGD
from ..zo.directions import DirectionSampler
from ..zo.reference import ReferenceZO
from ..zo.update import PendingUpdate, Rounding, draw_direction, perturb_into, update_group

T = TypeVar("T")


class _InstantLane:
    """Completes every task at once: what remains is the scheduler's own cost."""

    async def run(self, step: int, task: Task, work: Work, after: Sequence[object]) -> Completion:
        return Completion(0.0, 0.0)


class _ThreadTripLane:
    """Hands each task to one shared worker thread and returns when the thread has taken it: a
    trip through the event loop a task, as CUDA's lanes made before a pass went in one trip."""

    def __init__(self, executor: ThreadPoolExecutor) -> None:
        self.executor = executor

    async def run(self, step: int, task: Task, work: Work, after: Sequence[object]) -> Completion:
        await asyncio.get_running_loop().run_in_executor(self.executor, work)
        return Completion()


class _ThreadTripEnqueuer:
    """The same worker thread, handed a whole pass in one trip (``runtime.scheduler.Enqueuer``)."""

    def __init__(self, executor: ThreadPoolExecutor) -> None:
        self.executor = executor

    def enqueue(self, step: int, task: Task, work: Work, after: Sequence[object]) -> object:
        work()
        return None

    async def call(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn)


LANES = {
    "instant": "lanes that complete at once: the scheduler alone",
    "trip a task": "a trip to a worker thread a task",
    "trip a pass": "the whole pass in one trip to that thread (CUDA's path)",
}


def _loops() -> dict[str, Callable[[Coroutine[Any, Any, float]], float]]:
    loops: dict[str, Callable[[Coroutine[Any, Any, float]], float]] = {"asyncio": asyncio.run}
    try:
        import uvloop

        loops["uvloop"] = uvloop.run
    except ImportError:
        pass
    return loops


def scheduler_overhead(steps: int, blocks: int = 96) -> list[dict[str, Any]]:
    """Microseconds of host time a task, on lanes that do nothing: each of ``LANES``, each event
    loop, tracing off and on."""
    graph = step_graph(uniform_units(blocks), Plan(1))
    rows = []
    for loop_name, run in _loops().items():
        for lanes_name, traced in itertools.product(LANES, (False, True)):

            async def measure(lanes_name: str = lanes_name, traced: bool = traced) -> float:
                instruments = Instruments([TimelineRecorder()] if traced else [])
                with ThreadPoolExecutor(max_workers=1) as executor:
                    lanes: dict[Lane, LaneRunner] | Enqueuer = _ThreadTripEnqueuer(executor)
                    if lanes_name == "instant":
                        lanes = {lane: _InstantLane() for lane in Lane}
                    elif lanes_name == "trip a task":
                        lanes = dict.fromkeys(Lane, _ThreadTripLane(executor))
                    scheduler = Scheduler(lanes, instruments=instruments)
                    noop = lambda task: lambda: None  # noqa: E731
                    await scheduler.run(graph, noop, 0)  # warm up
                    start = time.perf_counter()
                    for step in range(steps):
                        await scheduler.run(graph, noop, step)
                    await scheduler.join()
                    return time.perf_counter() - start

            seconds = run(measure())
            tasks = steps * len(graph)
            rows.append({"loop": loop_name, "lanes": lanes_name, "tracing": traced, "tasks": tasks,
                         "us_per_task": 1e6 * seconds / tasks})  # fmt: skip
    return rows


def host_time_per_unit_task(
    steps: int, directions: Sequence[int] = (1, 2, 4, 8), unit: str = "block"
) -> dict[str, Any]:
    """Microseconds of host time per unit compute task (the pending update, each probe's draw,
    perturbed copy and forward) on blocks so small their kernels cost next to nothing: what the
    host spends issuing a task, which on a GPU caps how fast small units go. Measured at each
    number of two-sided ``directions`` (2q probes) and fitted as ``per_task + per_probe·probes``:
    the split ``GPUProfile.host_task_ms`` / ``host_probe_ms`` models."""
    config = tiny_opt_config(hidden_size=16, ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16,
                             num_hidden_layers=8, vocab_size=64, max_position_embeddings=8)  # fmt: skip
    data = {"input_ids": torch.randint(4, 64, (1, 8), generator=torch.Generator().manual_seed(0))}
    rows = []
    for q in directions:

        async def traced(q: int = q) -> Any:
            optimizer, policy = ZOSGD(lr=1e-6, directions=q), FixedDepth(1, unit=unit)
            async with engine.Runtime(random_opt(config, seed=0), optimizer, policy=policy, trace=True) as rt:
                for _ in range(steps + 1):
                    await rt.step(data)
            return rt.timeline.training_steps_from(1)

        spans = [s for s in engine.run(traced()).spans if s.kind == "compute"]
        rows.append({"directions": q, "probes": 2 * q, "tasks": len(spans),
                     "us_per_task": 1e6 * statistics.median(s.duration for s in spans)})  # fmt: skip
    fit = statistics.linear_regression([r["probes"] for r in rows], [r["us_per_task"] for r in rows])
    return {"unit": unit, "rows": rows, "us_per_task": fit.intercept, "us_per_probe": fit.slope}


class _Dispatched(TorchDispatchMode):
    """Counts the operations dispatched while it is entered (and the kernels ``_kernel_path``
    stands in for, one each)."""

    counting: ClassVar[list[_Dispatched]] = []  # the counters entered, innermost last

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __enter__(self) -> _Dispatched:
        _Dispatched.counting.append(self)
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        _Dispatched.counting.pop()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def _launch(*args: object, **kwargs: object) -> None:
    """A Triton kernel's launch, counted as one operation and not run."""
    if _Dispatched.counting:
        _Dispatched.counting[-1].count += 1


@contextmanager
def _kernel_path() -> Iterator[None]:
    """The calls as on a GPU with Triton, here: the update and the head's loss take their kernel
    paths (``zo/fused.py``, ``models/fused_loss.py``), each kernel counted as one launch, and a
    16-bit perturbed copy is one add, as off a CPU (``zo.update.perturb_into``)."""
    with ExitStack() as stack:
        stack.enter_context(patch.object(update_module, "_SIXTEEN_BIT", ()))
        for module in (fused, fused_loss):
            stack.enter_context(patch.object(module, "usable", lambda tensor: True))
        stack.enter_context(patch.object(fused, "update_span", _launch))
        stack.enter_context(patch.object(fused_loss, "lse_and_pick", _launch))
        yield


def _probe_ops(
    adapter: Any,
    layouts: list[Any],
    weights: list[torch.Tensor],
    scratch: list[torch.Tensor],
    views: dict[str, torch.Tensor],
    hidden: torch.Tensor,
    inputs: Any,
    sampler: DirectionSampler,
    on_gpu: bool,
    unit: str,
) -> int:
    """Operations one probe of a block's ``unit``s dispatches: z drawn into each unit's scratch,
    the perturbed copy, the unit's part of the forward (``on_gpu``: the copy as on a GPU)."""
    with ExitStack() as stack:
        if on_gpu:
            stack.enter_context(_kernel_path())
        if unit == "block":
            layer = adapter.bound_layer(0, views)
            with _Dispatched() as ops:
                perturb_into(scratch[0], weights[0], draw_direction(sampler, 2, layouts[0], scratch[0]), 1e-3)
                layer(hidden, adapter.layer_inputs(0, inputs))
        else:
            run = adapter.segmented_block(0, views)(hidden, inputs)
            with _Dispatched() as ops:
                for lay, w, z in zip(layouts, weights, scratch, strict=True):
                    perturb_into(z, w, draw_direction(sampler, 2, lay, z), 1e-3)
                    run.resume()
        return ops.count


def dispatched_per_task(name: str = "opt-1.3b", tokens: int = 16, head_tokens: int = 2048) -> dict[str, Any]:
    """Operations dispatched for OPT ``name`` (fp16 masters, zeros: the count does not depend on
    values) by one unit task, for each unit kind, as the mean over the first block's units: the
    pending update (stochastic rounding, weight decay) and one probe (z drawn into the perturbed
    copy's buffer, the copy, the unit's part of the block's forward on ``tokens``); and by the
    head's causal-LM loss over ``head_tokens`` for one probe (on the meta device: no arithmetic,
    the same calls)."""
    config = opt_config(name)
    config.num_hidden_layers = 1
    sampler = DirectionSampler("cpu")
    update = PendingUpdate.from_gradient(0, 1, 1e-6, 0.1, torch.tensor(0.5), Rounding.STOCHASTIC)
    ids = torch.randint(4, config.vocab_size, (1, head_tokens), generator=torch.Generator().manual_seed(0))
    hidden = torch.zeros(1, tokens, config.hidden_size, dtype=torch.float16)
    units: dict[str, dict[str, Any]] = {}
    for unit in UNIT_KINDS:
        adapter = adapter_for(meta_model(config, torch.float16), unit)
        inputs = adapter.prepare(adapter.validate({"input_ids": ids[:, :tokens]}), torch.device("cpu"), torch.float16)
        layouts = [adapter.groups()[u.group][0] for u in adapter.units.streamable if u.index == 0]
        weights = [torch.zeros(lay.numel, dtype=torch.float16) for lay in layouts]
        scratch = [torch.empty(lay.numel, dtype=torch.float16) for lay in layouts]
        views = {k: v for lay, buffer in zip(layouts, scratch, strict=True) for k, v in lay.views(buffer).items()}
        with torch.no_grad():
            with _Dispatched() as update_ops:
                for lay, w, z in zip(layouts, weights, scratch, strict=True):
                    update_group(w, update, lay, sampler, z)
            with _kernel_path(), _Dispatched() as update_gpu_ops:
                for lay, w, z in zip(layouts, weights, scratch, strict=True):
                    update_group(w, update, lay, sampler, z)
            probe_ops = [_probe_ops(adapter, layouts, weights, scratch, views, hidden, inputs, sampler, on_gpu, unit)
                         for on_gpu in (False, True)]  # fmt: skip
        units[unit] = {"units_per_block": len(layouts), "update_ops": update_ops.count / len(layouts),
                       "update_ops_gpu": update_gpu_ops.count / len(layouts), "probe_ops": probe_ops[0] / len(layouts),
                       "probe_ops_gpu": probe_ops[1] / len(layouts)}  # fmt: skip
    adapter = adapter_for(meta_model(config, torch.float16))
    ends = {k: torch.empty(p.shape, dtype=p.dtype, device="meta") for k, p in adapter.groups()[0][1].items()}
    batch = map_tensors(adapter.validate({"input_ids": ids}), lambda t: t.to("meta"))
    final = torch.empty(1, head_tokens, config.hidden_size, dtype=torch.float16, device="meta")
    with torch.no_grad(), _Dispatched() as head_ops:
        adapter.head_loss(ends, final, batch)
    with torch.no_grad(), _kernel_path(), _Dispatched() as head_gpu_ops:
        adapter.head_loss(ends, final, batch)
    return {"model": name, "units": units, "head_tokens": head_tokens, "head_ops": head_ops.count,
            "head_ops_gpu": head_gpu_ops.count}  # fmt: skip


def backend_over_reference(steps: int, batch: int, seq: int) -> list[dict[str, Any]]:
    config = tiny_opt_config(
        vocab_size=8192, hidden_size=512, num_hidden_layers=8, ffn_dim=2048, num_attention_heads=8,
        word_embed_proj_dim=512, max_position_embeddings=seq,
    )  # fmt: skip
    ids = torch.randint(4, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    data = {"input_ids": ids}
    optimizer = ZOSGD(lr=1e-6, eps=1e-3)

    ref = ReferenceZO(random_opt(config, seed=0), optimizer)
    ref.step(data)
    ref_times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        ref.step(data)
        ref_times.append(time.perf_counter() - t0)
    reference = statistics.median(ref_times)
    rows: list[dict[str, Any]] = [{"runner": "ReferenceZO", "median_step_s": reference, "ratio": 1.0}]

    for depth in (0, 1, 2):

        async def offloaded(depth: int = depth) -> list[float]:
            times = []
            async with engine.Runtime(random_opt(config, seed=0), optimizer, policy=FixedDepth(depth)) as rt:
                await rt.step(data)
                for _ in range(steps):
                    t0 = time.perf_counter()
                    await rt.step(data)
                    times.append(time.perf_counter() - t0)
            return times

        median = statistics.median(engine.run(offloaded()))
        rows.append(
            {
                "runner": f"Runtime cpu depth={depth}",
                "median_step_s": median,
                "ratio": median / rows[0]["median_step_s"],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    args = parser.parse_args()
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"machine: {machine}, torch threads {torch.get_num_threads()}")

    overhead = scheduler_overhead(steps=5 if args.quick else 200)
    print("\nscheduler overhead (96-block Algorithm 1 graph, lanes that do nothing): "
          + "; ".join(f"{name}: {meaning}" for name, meaning in LANES.items()))  # fmt: skip
    print(f"{'loop':<10}{'lanes':<14}{'tracing':<10}{'tasks':>10}{'us/task':>10}")
    for row in overhead:
        print(f"{row['loop']:<10}{row['lanes']:<14}{row['tracing']!s:<10}{row['tasks']:>10}{row['us_per_task']:>10.2f}")

    host = [host_time_per_unit_task(steps=3 if args.quick else 50, unit=unit) for unit in UNIT_KINDS]
    print("\nhost time per unit compute task (8 blocks of hidden 16, 1x8 tokens; two-sided; median over tasks)")
    heads = ["q=" + str(r["directions"]) + " us" for r in host[0]["rows"]]
    print(f"{'unit':<8}" + "".join(f"{h:>11}" for h in heads) + f"{'= per task':>12}{'+ per probe':>13}")
    for fit in host:
        print(
            f"{fit['unit']:<8}"
            + "".join(f"{r['us_per_task']:>11.0f}" for r in fit["rows"])
            + f"{fit['us_per_task']:>12.0f}{fit['us_per_probe']:>13.0f}"
        )

    ops = dispatched_per_task()
    print(f"\noperations dispatched, {ops['model']} (fp16, stochastic rounding, weight decay), per unit task; on a GPU "
          "with Triton, a kernel counts one")  # fmt: skip
    print(f"{'unit':<8}{'a block':>9}{'update':>9}{'on a GPU':>10}{'+ a probe':>11}{'on a GPU':>10}")
    for unit, row in ops["units"].items():
        print(f"{unit:<8}{row['units_per_block']:>9}{row['update_ops']:>9.0f}{row['update_ops_gpu']:>10.0f}"
              f"{row['probe_ops']:>11.0f}{row['probe_ops_gpu']:>10.0f}")  # fmt: skip
    print(f"the head's loss over {ops['head_tokens']} tokens, each probe: {ops['head_ops']} "
          f"({ops['head_ops_gpu']} on a GPU)")  # fmt: skip

    steps, batch, seq = (2, 1, 32) if args.quick else (10, 4, 256)
    cpu = backend_over_reference(steps=steps, batch=batch, seq=seq)
    print(f"\nCPU backend vs in-memory reference (OPT 8x512, fp32, batch {batch}x{seq}, median of {steps} steps)")
    print(f"{'runner':<24}{'step s':>10}{'ratio':>8}")
    for row in cpu:
        print(f"{row['runner']:<24}{row['median_step_s']:>10.4f}{row['ratio']:>8.3f}")

    print(json.dumps({"machine": machine, "scheduler_overhead": overhead, "host_per_unit_task": host,
                      "dispatched_per_task": ops, "cpu_backend": cpu}))  # fmt: skip


if __name__ == "__main__":
    main()
