"""The ``zoruntime`` command: one subcommand per job, each delegating to its module's ``main``.

zoruntime train                         fine-tune the built-in default (see zoruntime train --help)
zoruntime bench --model opt-1.3b        offloaded throughput vs MeZO and the transfer floor
zoruntime plan --model opt-13b         GPU memory and predicted speed of a plan
zoruntime trace summary TRACE.json      busy lanes, achieved GB/s, overlap efficiency, gaps
zoruntime trace plot TRACE.json -o OUT.png [--steps 10:13]
zoruntime replay --base MODEL --journal journal.jsonl --out DIR
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {
        "train": "fine-tune an OPT or Llama-family model; no options: the built-in default (zoruntime train --help)",
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
    try:
        return _run(command, rest, commands)
    except KeyboardInterrupt:  # while a command's libraries load: nothing started (train says more once running)
        print(f"zoruntime {command}: interrupted", file=sys.stderr)
        return 130


def _run(command: str, rest: list[str], commands: dict[str, str]) -> int:
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
    plot.add_argument("--steps", default=None, metavar="A:B",
                      help=f"the training steps A … B-1 to draw (default: all, or the last {PLOTTED_STEPS} of a "
                      f"trace of more than {MOST_PLOTTED} steps)")  # fmt: skip
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
    numbers = timeline.training_step_numbers
    try:
        first, stop = _step_window(args.steps, numbers)
    except ValueError as error:
        print(f"zoruntime trace: --steps {args.steps}: {error}", file=sys.stderr)
        return 2
    shown = timeline.training_steps(first, stop) if numbers else timeline
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
        path = shown.save_png(args.out, (width, height), recorded=len(numbers))
    except ValueError as error:
        print(f"zoruntime trace: bad --size {args.size!r}: {error}", file=sys.stderr)
        return 2
    drawn = shown.training_step_numbers
    which = f"steps {drawn[0]}-{drawn[-1]} of {len(numbers)}" if drawn else "the whole trace"
    print(f"wrote {path} ({which})")
    return 0


MOST_PLOTTED, PLOTTED_STEPS = 12, 3
"""A trace of more training steps than ``MOST_PLOTTED`` is drawn, by default, as its last
``PLOTTED_STEPS``: a thousand steps in one picture are a wall of boundaries."""


def _step_window(text: str | None, numbers: list[int]) -> tuple[int, int | None]:
    """``A:B`` (either side may be left out) as (first, stop); the default window otherwise."""
    if text is None:
        return (numbers[-PLOTTED_STEPS], None) if len(numbers) > MOST_PLOTTED else (0, None)
    start, colon, stop = text.partition(":")
    if not colon or not all(part.strip().isdigit() for part in (start, stop) if part.strip()):
        raise ValueError("give A:B, the steps A to B-1 (e.g. 10:13; A: or :B leave a side open)")
    first, end = int(start or 0), int(stop) if stop.strip() else None
    if not any(first <= n and (end is None or n < end) for n in numbers):
        raise ValueError(f"no training step there: the trace holds steps {numbers[0]}-{numbers[-1]}" if numbers
                         else "the trace holds no training steps")  # fmt: skip
    return first, end


if __name__ == "__main__":
    raise SystemExit(main())
