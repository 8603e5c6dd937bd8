"""GPU profiles: the measured figures a plan is predicted from. No torch.

A profile holds the link's speeds (pinned host→device and device→host alone, and the fraction
of that each keeps while both run), the compute rate the two forwards of a block reach, the
rate of the memory-bound work of a compute task (drawing z, perturbed copies, the update), and
the host's time to issue a compute task (a part per task, a part per probe: Python and kernel
launches, which the GPU cannot hide when its own work per task is shorter), what a probe saves
when a whole block's forward replays from a CUDA graph, and a piece of the head's loss, and where
measured, a whole block's tasks cut into finer units (else each unit is charged a whole block's
task: an upper bound, since a unit issues part of a block's operations); and the
workspace cuBLAS takes on each stream that runs matmuls (PyTorch allocates it from its caching
allocator on a stream's first matmul and keeps it). The built-in ones were measured by
``zoruntime bench`` on the machines named in them (their source says what was not);
``zoruntime bench --save-profile FILE`` writes one for your own GPU.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True, slots=True)
class GPUProfile:
    name: str
    upload_gb_s: float
    offload_gb_s: float
    duplex: float  # the fraction of its speed each direction keeps while both run
    tflops: float  # what both forwards of a block reach, in 1e12 flop/s
    memory_gb_s: float  # the draws, perturbed copies and update, in bytes touched per second
    gpu_memory_gb: float
    host_task_ms: float = 0.0  # the host's time to issue a unit's compute task, besides its probes (0: not modelled)
    host_probe_ms: float = 0.0  # and per probe (a draw, a perturbed copy, a forward)
    host_piece_ms: float = 0.0  # the host's time per piece of the head's loss (memory.loss_pieces; 0: not modelled)
    host_graph_saving_ms: float = (
        0.0  # what a perturbed probe's forward replayed from a CUDA graph saves (0: unmeasured)
    )
    blas_workspace_mib: float = 0.0  # cuBLAS's workspace on each stream that runs matmuls (0: not modelled)
    source: str = ""
    # the host's time to issue a whole block's compute tasks (two probes) cut into units of a kind
    # ("half", "linear"), as ``zoruntime bench --unit KIND`` times it; a kind not here: unmeasured
    host_cut_ms: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for text in ("name", "source"):  # shown and written as text (a JSON "name": 5 is none)
            if not isinstance(getattr(self, text), str):
                raise ValueError(f"a GPU profile's {text} must be text, got {getattr(self, text)!r}")
        for figure in (*_FIGURES, "duplex"):  # numbers, finite (a JSON true or 1e400 is none)
            value = getattr(self, figure)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"profile {self.name!r}: {figure} must be a finite number, got {value!r}")
        for figure in ("upload_gb_s", "offload_gb_s", "tflops", "memory_gb_s", "gpu_memory_gb"):
            if not getattr(self, figure) > 0:
                raise ValueError(f"profile {self.name!r}: {figure} must be > 0, got {getattr(self, figure)!r}")
        for figure in ("host_task_ms", "host_probe_ms", "host_piece_ms", "host_graph_saving_ms", "blas_workspace_mib"):
            if not getattr(self, figure) >= 0:
                raise ValueError(f"profile {self.name!r}: {figure} must be >= 0, got {getattr(self, figure)!r}")
        cuts = self.host_cut_ms.items() if isinstance(self.host_cut_ms, dict) else [("not a mapping", self.host_cut_ms)]
        for kind, ms in cuts:
            number = isinstance(ms, int | float) and not isinstance(ms, bool)
            if kind not in _FINER_UNITS or not number or not 0 < ms < math.inf:
                raise ValueError(f"profile {self.name!r}: host_cut_ms takes {' and '.join(_FINER_UNITS)} units, each a "
                                 f"time > 0 in ms, got {kind!r}: {ms!r}")  # fmt: skip
        if not 0 < self.duplex <= 1:
            raise ValueError(f"profile {self.name!r}: duplex must be in (0, 1], got {self.duplex!r}")

    def host_s(self, probes: int, graphed: int = 0, unit: str = "block", units_per_block: float = 1.0) -> float:
        """Seconds the host takes to issue a ``unit``'s compute task of ``probes`` forwards, ``graphed``
        of them replayed from CUDA graphs (each saving ``host_graph_saving_ms``, at most a probe's).
        A finer unit with a measured cut block: its share of the cut block's two-probe time, scaled
        to ``probes`` as a whole block's task scales; unmeasured: a whole block's task."""
        saving = min(self.host_graph_saving_ms, self.host_probe_ms)
        block_ms = self.host_task_ms + probes * self.host_probe_ms - graphed * saving
        if unit not in self.host_cut_ms:
            return block_ms / 1e3
        two_probes_ms = self.host_task_ms + 2 * self.host_probe_ms
        scale = block_ms / two_probes_ms if two_probes_ms > 0 else probes / 2
        return self.host_cut_ms[unit] / units_per_block * scale / 1e3

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path


_FINER_UNITS = ("half", "linear")
_FIGURES = ("upload_gb_s", "offload_gb_s", "tflops", "memory_gb_s", "gpu_memory_gb", "host_task_ms", "host_probe_ms",
            "host_piece_ms", "host_graph_saving_ms", "blas_workspace_mib")  # fmt: skip

BUILT_IN = {
    "h200": GPUProfile(
        "h200", upload_gb_s=55.2, offload_gb_s=55.4, duplex=0.91, tflops=655.0, memory_gb_s=1750.0,
        gpu_memory_gb=139.8, host_task_ms=1.18, host_probe_ms=0.46, host_piece_ms=0.138, blas_workspace_mib=32.0,
        source="measured: zoruntime bench on an NVIDIA H200, PCIe gen 5 x16, 2026-11-27 (links, opt-13b card); "
        "duplex 0.909 to 0.913 on five cards that evening; host: the opt-13b card of "
        "docs/results/2026-11-27-h200-fused-update.json (2.10 ms to enqueue a two-probe block task, "
        "1.18 ms a task + 0.46 ms a probe as its fit splits it; opt-1.3b's 2.12 ms), 0.138 ms a piece of "
        "the head's loss (tensor operations: an upper bound for the loss kernel's pieces); all with "
        "the update a launch per run and three enqueueing threads; cuBLAS's workspace PyTorch's default on "
        "Hopper (32 MiB a stream, cuBLASLt sharing it), not measured",
    ),
    "h100": GPUProfile(
        "h100", upload_gb_s=54.7, offload_gb_s=53.0, duplex=0.9, tflops=590.0, memory_gb_s=1700.0,
        gpu_memory_gb=79.6, host_task_ms=1.17, host_probe_ms=0.67, blas_workspace_mib=32.0,
        source="measured: zoruntime bench on an NVIDIA H100 80GB HBM3, PCIe gen 5 x16, 2026-11-26 (opt-13b card); "
        "duplex assumed as on the H200; host: a two-probe task spanned 2.5 ms of an opt-1.3b trace against "
        "1.6 ms of GPU time, split as on the H200; cuBLAS's workspace as on the H200",
    ),
}  # fmt: skip


def load_profile(name_or_path: str) -> GPUProfile:
    """A built-in profile by name (h200, h100) or one saved by ``zoruntime bench --save-profile``."""
    if name_or_path in BUILT_IN:
        return BUILT_IN[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(
            f"--gpu {name_or_path!r} is neither a built-in profile ({', '.join(BUILT_IN)}) nor a file; "
            "write one with zoruntime bench --save-profile FILE"
        )
    try:
        return GPUProfile(**json.loads(path.read_text()))
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path} is not a GPU profile ({type(error).__name__}: {error})") from None


def profile_for_device(device_name: str) -> GPUProfile | None:
    """The built-in profile of a GPU by the name CUDA gives it ("NVIDIA H200" → h200), or None."""
    name = device_name.lower()
    return next((profile for key, profile in BUILT_IN.items() if key in name), None)
