"""``python -m zoruntime``: the same as the ``zoruntime`` command."""

from .cli import main

raise SystemExit(main())
