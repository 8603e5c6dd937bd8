"""The ``zoruntime`` command: one subcommand per job, each delegating to its module's ``main``.

zoruntime train                         fine-tune the built-in default (see zoruntime train --help)
zoruntime bench --model opt-1.3b        offloaded throughput vs MeZO and the transfer floor
zoruntime plan --model opt-13b         GPU memory and predicted speed of a plan
zoruntime trace summary TRACE.json      busy lanes, achieved GB/s, overlap efficiency, gaps
zoruntime trace plot TRACE.json -o OUT.png
zoruntime replay --base MODEL --journal journal.jsonl --out DIR
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "train": "fine-tune an OPT model; no options: the built-in default (zoruntime train --help)",
        "bench": "throughput benchmark against MeZO and the transfer floor (zoruntime bench --help)",
        "plan": "GPU memory and predicted speed of a plan, and the fastest that fits (zoruntime plan --help)",
        "trace": "summarise or plot a saved timeline (zoruntime trace --help)",
        "replay": "rebuild fine-tuned weights from the base model and the journal (zoruntime replay --help)",
    }
    if not argv or argv[0] in {"-h", "--help"}:
        print("usage: zoruntime COMMAND [options]\n\ncommands:")
        for name, what in commands.items():
            print(f"  {name:<8} {what}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from .train import main as train

        return train(rest)
    if command == "bench":
        from .bench.throughput import main as bench

        return bench(rest)
    if command == "plan":
        from .plan import main as plan

        return plan(rest)
    if command == "trace":
        return trace(rest)
    if command == "replay":
        from .replay import main as replay

        return replay(rest)
    print(f"zoruntime: unknown command {command!r}; commands: {', '.join(commands)}", file=sys.stderr)
    return 2


def trace(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="zoruntime trace", description="Look at a saved timeline (Chrome trace JSON)."
    )
    sub = parser.add_subparsers(dest="action", required=True)
    summary = sub.add_parser("summary", help="print lane busy fractions, GB/s, overlap efficiency, largest gaps")
    summary.add_argument("trace", help="a trace written by Timeline.save_chrome_trace or `zoruntime train --trace`")
    plot = sub.add_parser("plot", help="draw the lanes over time as a PNG")
    plot.add_argument("trace", help="a trace written by Timeline.save_chrome_trace")
    plot.add_argument("-o", "--out", required=True, help="the PNG to write")
    plot.add_argument("--size", default="1600x480", help="width x height in pixels (default 1600x480)")
    args = parser.parse_args(argv)

    from .tracing import Timeline

    try:
        timeline = Timeline.load(args.trace)
    except ValueError as error:
        print(f"zoruntime trace: {error}", file=sys.stderr)
        return 2
    if args.action == "summary":
        timeline.summary(show=True)
        return 0
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
        path = timeline.save_png(args.out, (width, height))
    except ValueError as error:
        print(f"zoruntime trace: bad --size {args.size!r}: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
