"""``python -m zoruntime.bench.environment``: what machine a set of figures comes from.

Prints the GPU (name, memory, compute capability, driver, PCIe generation and width as
``nvidia-smi`` reads them, current and maximum: an idle link may report a lower current
generation), the host (CPU, cores, memory) and the versions of Python, torch, CUDA,
transformers and uvloop; then one JSON line. Fields that cannot be read are ``null``: a
machine without a GPU or without ``nvidia-smi`` still gets a report. Knows nothing about models.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from typing import Any

_SMI_FIELDS = (
    "name",
    "memory.total",
    "driver_version",
    "pcie.link.gen.current",
    "pcie.link.gen.max",
    "pcie.link.width.current",
    "pcie.link.width.max",
)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _nvidia_smi() -> dict[str, str | None]:
    """The first GPU's ``_SMI_FIELDS`` as nvidia-smi prints them (None where it cannot say)."""
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(_SMI_FIELDS)}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
    except (subprocess.SubprocessError, OSError):
        return {}
    first = done.stdout.strip().splitlines()[0] if done.stdout.strip() else ""
    values = [v.strip() for v in first.split(",")]
    if len(values) != len(_SMI_FIELDS):
        return {}
    return {field: (None if value.startswith("[") or value == "N/A" else value) for field, value in zip(
        _SMI_FIELDS, values, strict=True)}  # fmt: skip


def _host_memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": _version("transformers"),
        "uvloop": _version("uvloop"),
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "host_memory_gib": _host_memory_gib(),
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        smi = _nvidia_smi()
        facts["gpu"] = {
            "name": props.name,
            "memory_gib": props.total_memory / 2**30,
            "compute_capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "driver": smi.get("driver_version"),
            "pcie_gen_current": smi.get("pcie.link.gen.current"),
            "pcie_gen_max": smi.get("pcie.link.gen.max"),
            "pcie_width_current": smi.get("pcie.link.width.current"),
            "pcie_width_max": smi.get("pcie.link.width.max"),
        }
    return facts


def main() -> int:
    facts = describe()
    gpu = facts["gpu"]
    rows = [
        ("GPU", "none visible" if gpu is None else f"{gpu['name']}, {gpu['memory_gib']:.1f} GiB, "
         f"compute capability {gpu['compute_capability']}, {gpu['multiprocessors']} SMs"),
    ]  # fmt: skip
    if gpu is not None:
        rows.append(("driver", str(gpu["driver"])))
        rows.append(("PCIe", f"gen {gpu['pcie_gen_current']} (max {gpu['pcie_gen_max']}), "
                     f"x{gpu['pcie_width_current']} (max x{gpu['pcie_width_max']})"))  # fmt: skip
    memory = facts["host_memory_gib"]
    rows += [
        ("host", f"{facts['cpu']}, {facts['cpu_cores']} cores, "
         f"{f'{memory:.0f} GiB' if memory is not None else 'memory unknown'}"),
        ("versions", f"Python {facts['python']}, torch {facts['torch']} (CUDA {facts['cuda']}), "
         f"transformers {facts['transformers']}, uvloop {facts['uvloop']}"),
    ]  # fmt: skip
    for name, value in rows:
        print(f"{name:<10}{value}")
    print(json.dumps(facts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
