"""A cost model: per-task durations from bytes, bandwidth, flops and compute rate. No torch.

Feeds the simulated backend for what-if planning ("how fast would opt-30b stream on this
link?") and gives the analytic pipeline bound a step cannot beat.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OpFigures:
    """Seconds per task kind for one block (``embed_s`` and ``head_s`` once per step)."""

    upload_s: float
    compute_s: float
    offload_s: float
    embed_s: float = 0.0
    head_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("upload_s", "compute_s", "offload_s", "embed_s", "head_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 seconds, got {getattr(self, name)}")

    def duration(self, kind: str) -> float:
        """Seconds for a task of ``kind`` (the task kinds of ``zoruntime.runtime.graph``)."""
        return {
            "upload": self.upload_s,
            "compute": self.compute_s,
            "eval": self.compute_s / 2,
            "update": 0.0,
            "offload": self.offload_s,
            "embed": self.embed_s,
            "head": self.head_s,
        }[kind]

    def pipeline_bound(self, num_blocks: int, steps: int = 1) -> float:
        """A lower bound on ``steps`` consecutive streamed steps: one fill and drain, then every
        block at the pace of the busiest lane, ``u + c + o + (K·N − 1)·max(u, c, o)``, or the
        compute lane's own work ``K·(embed + N·c + head)`` if that is longer (steps overlap: the
        next step's first uploads run under the head). Exact for the runtime's schedule when
        the embedding fits under the first upload and the head under the last offload."""
        u, c, o = self.upload_s, self.compute_s, self.offload_s
        pipeline = u + c + o + (steps * num_blocks - 1) * max(u, c, o)
        return max(pipeline, steps * (self.embed_s + num_blocks * c + self.head_s))

    def upload_floor(self, num_blocks: int) -> float:
        """The floor a streamed step cannot beat when offloads need not happen every step: each
        block must come up the link and be computed, ``N·max(u, c)`` (the benchmarks' "x floor")."""
        return num_blocks * max(self.upload_s, self.compute_s)

    def serial_time(self, num_blocks: int) -> float:
        return self.embed_s + num_blocks * (self.upload_s + self.compute_s + self.offload_s) + self.head_s


@dataclass(frozen=True, slots=True)
class CostModel:
    """Durations from the hardware: link bandwidth each way and the compute rate."""

    block_bytes: int
    block_flops: float  # both perturbed forwards of one block
    upload_bytes_per_s: float
    offload_bytes_per_s: float
    flops_per_s: float

    def figures(self) -> OpFigures:
        return OpFigures(
            upload_s=self.block_bytes / self.upload_bytes_per_s,
            compute_s=self.block_flops / self.flops_per_s,
            offload_s=self.block_bytes / self.offload_bytes_per_s,
        )


def cycle_block_time(figures: OpFigures, offload_every: int, update_s: float, duplex: float) -> float:
    """Mean steady-state seconds per block over a cycle of ``offload_every`` steps.

    At the cycle's i-th step (i = 0 … k − 1) an upload carries a master that missed i + 1
    updates, so the compute task applies i more than usual (``update_s`` each: a draw and an
    add). The cycle's last step also offloads, and while both copy directions run each goes at
    ``duplex`` of its speed. A block then takes ``max(u, c + i·a)`` on the steps that keep
    their copies and ``max(u/d, c + i·a, o/d)`` on the one that writes back. Fills are left out.
    """
    if offload_every < 1 or not 0 < duplex <= 1 or update_s < 0:
        raise ValueError("need offload_every >= 1, 0 < duplex <= 1 and update_s >= 0")
    u, c, o = figures.upload_s, figures.compute_s, figures.offload_s
    times = [max(u, c + i * update_s) for i in range(offload_every - 1)]
    last = c + (offload_every - 1) * update_s
    times.append(max(u / duplex, last, o / duplex))
    return sum(times) / offload_every


def choose_offload_every(figures: OpFigures, update_s: float, duplex: float, most: int = 16) -> int:
    """The k in 1 … ``most`` with the shortest mean step: fewer write-backs free the link's other
    direction, and every skipped one costs each later upload one more update to apply."""
    return min(range(1, most + 1), key=lambda k: (cycle_block_time(figures, k, update_s, duplex), k))
