"""The ``zoruntime`` command: one subcommand per job, each delegating to its module's ``main``.

zoruntime bench --model opt-1.3b        offloaded throughput vs MeZO and the transfer floor
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"bench": "throughput benchmark against MeZO and the transfer floor (zoruntime bench --help)"}
    if not argv or argv[0] in {"-h", "--help"}:
        print("usage: zoruntime COMMAND [options]\n\ncommands:")
        for name, what in commands.items():
            print(f"  {name:<8} {what}")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from .bench.throughput import main as bench

        return bench(rest)
    print(f"zoruntime: unknown command {command!r}; commands: {', '.join(commands)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
