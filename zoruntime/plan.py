"""``zoruntime plan``: what a plan needs and how fast it should run, before any GPU is touched.

    zoruntime plan --model opt-13b --dtype fp16 --batch 1 --seq 2048 --gpu h200 --gpu-memory 24GB
    zoruntime plan --model opt-13b --policy depth=1 --directions auto --estimator one-sided

Prints the GPU memory a policy needs, part by part (the memory model, the figure the runtime
allocates, plus activations and cuBLAS's workspaces), its predicted step time and tokens/s (the real scheduler on the
simulator, with times from a GPU profile), the upload-only floor, and the fastest policy the
search finds within the memory given, over every depth, offload interval, resident set and
unit (whole blocks, halves, a unit per linear layer). With ``--directions q`` (and
``--estimator``) a step evaluates q directions per upload; ``--directions auto`` takes the
largest q whose forwards the transfers of ``--policy`` (default depth=1) hide, as ``zoruntime
train --directions auto`` would. The last line is one JSON object (``fits``: whether the policy it
describes fits in the memory given; the exit status is 1 when it does not, or nothing fits).
Predictions, not measurements: ``zoruntime bench`` measures, and ``--save-profile`` turns its
card into a profile.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from typing import Any

import torch

from .models.shapes import MODEL_NAMES, named_config
from .planning.directions import auto_directions, fewest_directions
from .planning.memory import show_size
from .planning.planner import Prediction, best, predict, predict_memory
from .planning.profiles import BUILT_IN, GPUProfile, load_profile
from .policies.base import FixedDepth, Plan
from .train.options import UsageError, parse_directions, parse_fit, parse_policy, parse_size, policy_arg
from .workloads import workloads
from .zo.estimator import ESTIMATORS

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _show(title: str, prediction: Prediction, profile: GPUProfile) -> None:
    print(f"{title}: {prediction.policy}")
    width = max(map(len, prediction.memory))
    for part, size in {**prediction.memory, "GPU memory in all": prediction.gpu_bytes}.items():
        print(f"  {part:<{width}}{size / 1e9:>9.3f} GB")
    print(f"  step {prediction.step_s:.4f} s, {prediction.tokens_per_s:,.0f} tokens/s; upload-only floor "
          f"{prediction.floor_tokens_per_s:,.0f} tokens/s; {prediction.ratio_to_floor:.2f}x the floor "
          "(predicted)")  # fmt: skip
    upload, gpu, host = (prediction.paces[k] * 1e3 for k in ("the link", "the GPU", "the host"))
    print(f"  a streamed unit: upload {upload:.2f} ms, its task on the GPU {gpu:.2f} ms, the host issuing it "
          f"{host:.2f} ms: paced by {prediction.bound_by}")  # fmt: skip
    unit = getattr(prediction.chosen, "unit", "block")
    if unit != "block" and unit not in profile.host_cut_ms:
        print(f"  (the host's time for a {unit} unit is a whole block's, an upper bound: the profile has no cut block; "
              f"measure one with zoruntime bench --unit {unit} --save-profile FILE)")  # fmt: skip
    if prediction.chosen is not None:
        print(f"  zoruntime train --policy {policy_arg(prediction.chosen)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="zoruntime plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="opt-13b", help=f"a shape by name: {', '.join(MODEL_NAMES)} (default opt-13b)"
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="weights and compute (default fp16)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default 2048)")
    parser.add_argument(
        "--gpu", default="h200", help=f"a built-in profile ({', '.join(BUILT_IN)}) or a profile file (default h200)"
    )
    parser.add_argument(
        "--policy",
        default=None,
        help="a policy to predict, as in zoruntime train (depth=1,offload=4,unit=linear; fit=24GB: as --gpu-memory)",
    )
    parser.add_argument("--gpu-memory", default=None, help="memory to plan within, e.g. 24GB (default: the GPU's)")
    parser.add_argument("--directions", type=parse_directions, default=1, help="per step, or auto (default 1)")
    parser.add_argument("--estimator", choices=ESTIMATORS, default="two-sided", help="(default two-sided)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="whole blocks' forwards replayed from CUDA graphs, as zoruntime train --cuda-graphs "
                        "(the host's saving a probe comes from the profile)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        if args.batch <= 0 or args.seq <= 0:
            raise UsageError("--batch and --seq must be positive")
        auto, fewest = args.directions == "auto", fewest_directions(args.estimator)
        args.directions = fewest if auto else args.directions  # auto: the fewest until the plan is known
        if args.directions < fewest:
            raise UsageError(f"--directions must be a number >= {fewest} with --estimator {args.estimator}, or auto")
        profile = load_profile(args.gpu)
        config = named_config(args.model)
        if args.seq > config.max_position_embeddings:
            raise UsageError(f"--seq {args.seq} is longer than the model's {config.max_position_embeddings} positions")
        dtype = DTYPES[args.dtype]
        works = workloads(config, dtype, args.batch, args.seq, args.directions, args.estimator,
                          cuda_graphs=args.cuda_graphs, auto=auto)  # fmt: skip
        gpu_bytes = parse_size(args.gpu_memory) if args.gpu_memory else int(profile.gpu_memory_gb * 1e9)
        fit = parse_fit(args.policy) if args.policy else None  # fit=SIZE: the fastest plan within SIZE
        if fit is not None and args.gpu_memory and fit != gpu_bytes:
            raise UsageError(f"--policy {args.policy} and --gpu-memory {args.gpu_memory} differ: give one of them")
        gpu_bytes = fit if fit is not None else gpu_bytes
        policy = parse_policy(args.policy) if args.policy and fit is None else None
        unit = getattr(policy, "unit", "block")
        if policy is not None and unit not in works:
            raise UsageError(f"--policy {args.policy}: {args.model}'s blocks cannot be cut into unit={unit!r}")
        if auto:  # for the policy given, else the runtime's default, FixedDepth(1)
            work = works[unit]
            args.directions = auto_directions(work, profile, (policy or FixedDepth(1)).plan(work.layout),
                                              args.estimator)  # fmt: skip
            works = {u: replace(w, directions=args.directions) for u, w in works.items()}
        chosen = predict(works[unit], profile, policy) if policy is not None else None
        found = best(list(works.values()), profile, gpu_bytes)
    except (UsageError, ValueError) as error:
        print(f"zoruntime plan: error: {error}", file=sys.stderr)
        return 2
    rounding = "nearest" if args.dtype == "fp32" else "stochastic"  # ZOSGD's default (either costs the same)
    several = f", {args.directions} {args.estimator} direction(s) a step{' (auto)' if auto else ''}"
    print(f"zoruntime plan: {args.model} {args.dtype} ({rounding} rounding), batch {args.batch} x {args.seq}{several}, "
          f"on the {profile.name} profile ({profile.source}); within {show_size(gpu_bytes)}")  # fmt: skip
    if args.cuda_graphs:
        saving = profile.host_graph_saving_ms
        print(f"  with CUDA graphs: a whole block's perturbed probe costs the host {saving:.3f} ms less"
              + ("" if saving else " (the profile has no measured saving: as without graphs; measure one with "
                 "zoruntime bench --cuda-graphs --save-profile FILE)"))  # fmt: skip
    if chosen is not None:
        _show("your policy", chosen, profile)
        if chosen.gpu_bytes > gpu_bytes:
            print(f"  needs {show_size(chosen.gpu_bytes)}, more than the {show_size(gpu_bytes)} planned within: "
                  "it would run out of memory")  # fmt: skip
    if found is not None:
        _show("fastest that fits", found, profile)
    else:
        least, unit = min((predict_memory(work, Plan(0), profile), unit) for unit, work in works.items())
        print(f"nothing fits in {show_size(gpu_bytes)}: the least any plan needs is {show_size(least)} "
              f"(--policy {policy_arg(FixedDepth(0, unit=unit))})")  # fmt: skip
    result = chosen or found
    fits = result is not None and result.gpu_bytes <= gpu_bytes
    summary: dict[str, Any] = {**result.summary(), "fits": fits} if result else {"policy": None}
    if result is not None and result.chosen is not None:
        summary["policy_arg"] = policy_arg(result.chosen)  # as zoruntime train --policy takes it
    print(json.dumps({"model": args.model, "gpu": profile.name, "directions": args.directions,
                      "estimator": args.estimator, **summary}))  # fmt: skip
    return 0 if fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
