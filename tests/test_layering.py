"""Invariant 7: the scheduler core imports no torch; OPT only in the OPT adapter; ZO math only in zo/."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "zoruntime"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_runtime_core_policies_and_planning_import_only_the_stdlib_and_each_other() -> None:
    for folder in ("runtime", "policies", "planning"):
        for path in (PACKAGE / folder).glob("*.py"):
            for name in _imports(path):
                assert name.startswith(".") or name.split(".")[0] in sys.stdlib_module_names, (path, name)


def test_importing_the_core_does_not_load_torch() -> None:
    code = "import sys, zoruntime.runtime, zoruntime.policies, zoruntime.planning.planner, zoruntime.testing; "
    code += "print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == (
        "False"
    )


def test_opt_is_named_only_in_the_opt_adapter_and_model_init() -> None:
    for path in PACKAGE.rglob("*.py"):
        if path.name in {"opt.py", "init.py"}:
            continue
        assert "OPTForCausalLM" not in path.read_text() or path.name == "__init__.py", path


def test_zo_arithmetic_lives_only_in_zo() -> None:
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "zo":
            continue
        text = path.read_text()
        assert "addcmul" not in text and "alpha=" not in text, path  # perturbation and update arithmetic


def test_the_package_never_touches_the_global_rng() -> None:
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        for call in ("torch.manual_seed(", "torch.cuda.manual_seed", "set_rng_state(", "torch.seed("):
            assert call not in text, (path, call)
