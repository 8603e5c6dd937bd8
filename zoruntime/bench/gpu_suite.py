"""``python -m zoruntime.bench.gpu_suite --out DIR``: everything GPU-side in one command.

Checks an install on a GPU and measures it. Parts, in order: the environment (GPU, driver,
PCIe link, versions); ``pytest -m cuda``; ``zoruntime bench`` for opt-1.3b, opt-6.7b, opt-13b,
opt-30b and opt-175b (alias mode: the blocks share one host buffer), fp16, batch 1 x 2048,
every runner (and, but for the aliased models, FixedDepth(1) with four directions a step), with
a few traced steps of opt-13b drawn as a PNG; with ``--planned MODEL=GB``, also the plan the
planner finds within GB, its prediction from the model's own card beside the measurement.

Each part runs in its own process under its own time limit, and the whole suite under a
budget (``--budget-s``): a part that crashes, hangs or runs out of time is recorded as such and
the next one runs. Everything goes under DIR: ``logs/PART.log`` (each part's whole output),
``results.json`` (every part's status, seconds and the JSON line it printed), the opt-13b
trace (``trace_opt-13b.png`` and ``.json``). A summary table is printed at the end.

``--device cpu --models tiny --seq 32`` runs the same machinery on a CPU in seconds (the tests
do), where the figures mean nothing. Knows which commands make up the suite and how to run
them; knows nothing about what they measure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding zoruntime/ (and tests/ in a checkout)
MODELS = ("opt-1.3b", "opt-6.7b", "opt-13b", "opt-30b", "opt-175b")
ALIASED = frozenset({"opt-66b", "opt-175b", "llama-2-70b", "llama-3.1-70b", "qwen2.5-72b"})  # beyond most hosts' memory
# timed steps per runner and the part's time limit, sized for one H100 (a 175B step is ~7 s)
BENCH_STEPS = {"opt-1.3b": 5, "opt-6.7b": 3, "opt-13b": 3, "opt-30b": 2, "opt-175b": 1, "llama-3.1-8b": 3}
BENCH_LIMIT_S = {"opt-1.3b": 120, "opt-6.7b": 150, "opt-13b": 180, "opt-30b": 180, "opt-175b": 240, "llama-3.1-8b": 150}


@dataclass(frozen=True, slots=True)
class Part:
    """One command of the suite: ``argv`` run under ``limit_s`` seconds."""

    name: str
    argv: tuple[str, ...]
    limit_s: float
    junit: Path | None = None  # pytest's report, read for the test counts


@dataclass(slots=True)
class PartResult:
    name: str
    status: str  # ok | failed | timeout | not run
    seconds: float
    returncode: int | None
    log: str
    result: dict[str, Any] | None = None  # the last JSON line the part printed (tests: the counts)
    note: str = ""
    command: list[str] = field(default_factory=list)


def _last_json_line(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                return None
            return value if isinstance(value, dict) else None
    return None


def _test_counts(junit: Path) -> dict[str, Any] | None:
    try:
        root = ElementTree.parse(junit).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    counts: dict[str, Any] = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return counts


def _child_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    paths = [str(PACKAGE_ROOT), *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def run_part(part: Part, logs: Path, limit_s: float) -> PartResult:
    """Run one part with its output in ``logs/NAME.log``; kill its process group after ``limit_s``."""
    log = logs / f"{part.name}.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        out.write(f"$ {' '.join(part.argv)}\n")
        out.flush()
        child = subprocess.Popen(
            part.argv, stdout=out, stderr=subprocess.STDOUT, env=_child_env(), start_new_session=True
        )
        try:
            returncode: int | None = child.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            returncode = None
    seconds = time.perf_counter() - started
    text = log.read_text(errors="replace")
    result = _test_counts(part.junit) if part.junit is not None else _last_json_line(text)
    if returncode is None:
        status, note = "timeout", f"killed after its limit of {limit_s:.0f} s"
    elif returncode == 0:
        status, note = "ok", ""
    else:
        status, note = "failed", f"exit code {returncode}: {_last_error(text)}"
    return PartResult(part.name, status, seconds, returncode, str(log), result, note, list(part.argv))


def _last_error(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line or line.startswith(("FAILED", "E ")):
            return line[:200]
    return lines[-1][:200] if lines else "no output"


def run_suite(parts: list[Part], out: Path, budget_s: float, echo: bool = True) -> list[PartResult]:
    """Run ``parts`` in order, each under ``min(its limit, what is left of the budget)``; a part
    that fails or times out does not stop the next. Writes ``results.json`` after every part."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    deadline = time.perf_counter() + budget_s
    results: list[PartResult] = []
    for part in parts:
        left = deadline - time.perf_counter()
        if left < 1.0:
            results.append(PartResult(part.name, "not run", 0.0, None, "", None, "the suite's budget was used up"))
        else:
            results.append(run_part(part, logs, min(part.limit_s, left)))
        if echo:
            done = results[-1]
            print(f"[{done.status:>7}] {done.name:<10} {done.seconds:7.1f} s  {done.note}", flush=True)
        (out / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
    return results


def default_parts(
    out: Path,
    *,
    device: str,
    models: tuple[str, ...],
    seq: int,
    traced: frozenset[str] = frozenset(),
    directions: tuple[int, ...] = (),
    planned: dict[str, tuple[float, ...]] | None = None,
) -> list[Part]:
    python = sys.executable
    parts = [Part("env", (python, "-m", "zoruntime.bench.environment"), 60)]
    tests = PACKAGE_ROOT / "tests"
    if tests.is_dir():
        junit = out / "logs" / "pytest.xml"
        pytest = (python, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}")
        parts.append(Part("pytest", (*pytest, str(tests)), 180, junit))
    for entry in models:  # a model, or model:unit (opt-175b:linear streams a unit per linear layer)
        model, _, unit = entry.partition(":")
        argv = [python, "-m", "zoruntime.bench.throughput", "--model", model, "--device", device, "--dtype", "fp16"]
        argv += ["--batch", "1", "--seq", str(seq), "--steps", str(BENCH_STEPS.get(model, 1))]
        if model in ALIASED:
            argv.append("--alias")
        if unit:
            argv += ["--unit", unit]
        elif device != "cpu":  # whole blocks on a GPU: FixedDepth(1) and all resident again, from CUDA graphs
            argv.append("--cuda-graphs")
        argv += ["--save-profile", str(out / f"profile_{entry.replace(':', '_')}.json")]  # for zoruntime plan --gpu
        if entry in traced:
            argv += ["--trace-out", str(out / f"trace_{entry.replace(':', '_')}")]
        if directions and model not in ALIASED:  # several directions a step cost several 175B steps' time
            argv += ["--directions", *map(str, directions)]
        if planned and entry in planned:  # the planner's plan within each size, beside its prediction
            argv += ["--planned", *(f"{gb:g}" for gb in planned[entry])]
        parts.append(Part(entry, tuple(argv), BENCH_LIMIT_S.get(model, 120)))
    return parts


def render_summary(results: list[PartResult]) -> str:
    lines = [f"{'part':<10}{'status':>9}{'seconds':>9}  note", "-" * 60]
    for r in results:
        note = r.note
        if r.name == "pytest" and r.result is not None:
            note = (f"{r.result['passed']} passed, {r.result['failures'] + r.result['errors']} failed, "
                    f"{r.result['skipped']} skipped" + (f"; {note}" if note else ""))  # fmt: skip
        lines.append(f"{r.name:<10}{r.status:>9}{r.seconds:>9.1f}  {note}")
    env = next((r.result for r in results if r.name == "env" and r.result), None)
    if env:
        gpu = env.get("gpu") or {}
        link = f"PCIe gen {gpu.get('pcie_gen_current')} (max {gpu.get('pcie_gen_max')})"
        link += f" x{gpu.get('pcie_width_current')}"
        lines += ["", f"GPU: {gpu.get('name', 'none')}, driver {gpu.get('driver')}, {link}; torch {env.get('torch')}, "
                  f"transformers {env.get('transformers')}, Python {env.get('python')}"]  # fmt: skip
    header = f"{'model':<10}{'runner':<26}{'tokens/s':>10}{'step s':>9}{'peak MB':>9}{'used MB':>9}"
    header += f"{'x floor':>8}{'x MeZO':>7}"
    rows = []
    for r in results:
        bench = r.result if r.result and "rows" in r.result else None
        if bench is None:
            continue
        card = bench["card"]
        rows.append(f"{r.name:<10}card: {card['block_mb']:.0f} MB blocks, upload {card['upload_gb_s']:.1f} GB/s, "
                    f"offload {card['offload_gb_s']:.1f} GB/s, compute task {card['compute_task_ms']:.2f} ms, "
                    f"floor {card['floor_tokens_s']:,.0f} tokens/s ({card['bound_by']}-bound), "
                    f"{card['duplex_floor_tokens_s']:,.0f} writing back every step "
                    f"(duplex {card['duplex']:.2f})")  # fmt: skip
        if "host_piece_ms" in card:  # the host's time to issue a block's task and a probe's head
            rows.append(f"{'':<10}host: a task {card['compute_enqueue_ms']:.2f} ms ({card['host_task_ms']:.2f} + "
                        f"{card['host_probe_ms']:.2f} a probe); the head {card['head_ms']:.2f} ms on the device, "
                        f"{card['head_enqueue_ms']:.2f} ms to issue ({card['host_piece_ms']:.3f} a piece)")  # fmt: skip
            parts = ", ".join(f"{name} {ms:.3f}" for name, ms in card["host_parts_ms"].items())
            rows.append(f"{'':<10}host, each part alone (ms): {parts}")
        if "unit_tasks_enqueue_ms" in card:
            rows.append(f"{'':<10}host: the block as {card['units_per_block']} {card['unit']} units' tasks "
                        f"{card['unit_tasks_enqueue_ms']:.2f} ms")  # fmt: skip
        for row in bench["rows"]:
            if "error" in row:
                rows.append(f"{'':<10}{row['runner']:<26}failed: {row['error'][:60]}")
                continue
            fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
            rows.append(
                f"{'':<10}{row['runner']:<26}{row['tokens_s']:>10,.0f}{row['step_s']:>9.3f}"
                f"{fmt(row['peak_allocated_mb'], ',.0f'):>9}{fmt(row['used_mb'], ',.0f'):>9}"
                f"{row['x_floor']:>8.2f}{fmt(row['x_mezo'], '.2f'):>7}"
            )
            if "predicted_step_s" in row:
                rows.append(f"{'':<10}{'':<26}predicted {row['predicted_step_s']:.3f} s, "
                            f"{row['predicted_gpu_mb']:,.0f} MB, paced by {row['predicted_bound_by']}")  # fmt: skip
        if bench.get("trace"):
            t = bench["trace"]
            busy = ", ".join(f"{lane} {v:.0%}" for lane, v in t["lane_busy"].items())
            rows.append(f"{'':<10}trace: {t['steps']} steps of FixedDepth(1), lanes busy {busy}, "
                        f"overlap efficiency {t['overlap_efficiency']:.0%}; {t['png']}")  # fmt: skip
            if t.get("issue_ms") is not None:  # did the host keep ahead of the GPU?
                rows.append(f"{'':<10}host: a step issued over {t['issue_ms']:.1f} ms; compute tasks started "
                            f"{t['issue_to_start_ms']:.2f} ms after issue (median), {t['started_on_issue']:.0%} "
                            "on issue (the GPU waiting for the host)")  # fmt: skip
    if rows:
        lines += ["", header, *rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zoruntime.bench.gpu_suite", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--out", required=True, help="folder for logs/, results.json and the trace")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run of the machinery)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default {','.join(MODELS)})")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence (default 2048)")
    parser.add_argument("--trace", default="opt-13b", help="comma-separated models to trace a few steps of")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out (env, pytest, a model name)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="the whole suite's time (default 450 s)")
    parser.add_argument("--directions", default="4",
                        help="comma-separated q: also time FixedDepth(1) with q two-sided directions a step, on "
                        "every model but the aliased ones (default 4; '' for none)")  # fmt: skip
    parser.add_argument("--planned", nargs="*", default=[], metavar="MODEL=GB[,GB]",
                        help="also run the plan zoruntime plan finds for MODEL (as --models names it) within each "
                        "GB, its prediction beside it (opt-1.3b:linear=0.6 opt-175b:linear=8)")  # fmt: skip
    args = parser.parse_args(argv)
    models = tuple(m for m in args.models.split(",") if m)
    planned: dict[str, tuple[float, ...]] = {}
    for text in args.planned:
        entry, _, sizes = text.partition("=")
        try:
            planned[entry] = tuple(float(gb) for gb in sizes.split(","))
        except ValueError:
            parser.error(f"--planned {text!r}: write MODEL=GB[,GB], e.g. opt-175b:linear=8")
        if entry not in models or not planned[entry] or min(planned[entry]) <= 0:
            parser.error(f"--planned {text!r}: the model must be one of --models ({args.models}) and each GB positive")
    if args.seq <= 0 or args.budget_s <= 0:
        parser.error("--seq and --budget-s must be positive")
    out = Path(args.out)
    skip = {s for s in args.skip.split(",") if s}
    traced = frozenset(m for m in args.trace.split(",") if m)
    directions = tuple(int(q) for q in args.directions.split(",") if q)
    parts = default_parts(out, device=args.device, models=models, seq=args.seq, traced=traced, directions=directions,
                          planned=planned)  # fmt: skip
    unknown = skip - {p.name for p in parts}
    if unknown:
        parser.error(f"--skip names no part: {', '.join(sorted(unknown))}; parts: {', '.join(p.name for p in parts)}")
    parts = [p for p in parts if p.name not in skip]
    import torch  # here, not at the top: the suite's parts run as processes of their own

    if args.device == "cuda" and not torch.cuda.is_available():  # each part would fail after its start-up
        why = "no CUDA GPU is visible here; run it on the machine with the GPU (or --device cpu: a smoke run)"
        parser.exit(2, f"{parser.prog}: error: {why}\n")  # the machine, not the usage: no usage block
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = run_suite(parts, out, args.budget_s)
    print(f"\nzoruntime GPU suite: {time.perf_counter() - started:.0f} s in all; results in {out / 'results.json'}\n")
    print(render_summary(results))
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
