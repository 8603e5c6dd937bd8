"""Predictions for a plan on a GPU profile, and the search for the fastest plan that fits. No torch.

For a model (its groups' sizes and its widths), a batch and a profile, each task's time follows
from the profile: a unit's upload and offload from the link speeds; its compute task from the
flops of its forwards (one per probe: two for MeZO's step, 2q or q + 1 with q directions; two
flops per parameter and token, plus causal attention) at the profile's rate and the bytes its
draws, perturbed copies and update touch at the memory rate, or, where longer, the host's time to
issue the task (the profile's cost per task and per probe: Python and launches; units finer than
a block pay it per unit); one more missed update (its draws and the add) for offloads every k
steps; the head from the logits' flops or, where longer, the host's time to issue its loss's
pieces (the profile's cost per piece; not modelled where the profile lacks it). The floor a prediction
is compared with leaves the host out: the link and the GPU's own work.
Units finer than a block (halves, linear layers) differ in size: the simulator gives each unit
its share of the mean unit's times by its size (the host's part too, which is in fact a cost per
task: an approximation where the host sets the pace).
The simulator then runs the real scheduler on those times for two offload cycles, and the step
time is the second cycle's mean: steps overlap, as the runtime's do when the caller calls again
at once (the host's own time between calls is not modelled). The GPU memory a plan needs is the
memory model's figure plus the activations and cuBLAS's workspace on each stream that runs
matmuls (the compute lane's, and the one CUDA graphs are captured on).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..policies.base import UNIT_KINDS, FixedDepth, MemoryBudget, Plan, Policy
from .cost import OpFigures
from .memory import ModelDims, ModelLayout, activation_bytes, loss_pieces, show_size
from .profiles import GPUProfile
from .simulate import simulate

DEPTHS = (0, 1, 2, 3)
OFFLOAD_EVERY = (1, 2, 3, 4, 6, 8)


def probe_count(estimator: str, directions: int) -> int:
    """Forwards per unit and step: two per direction (two-sided), or one at θ and one per direction."""
    return 2 * directions if estimator == "two-sided" else directions + 1


@dataclass(frozen=True, slots=True)
class Workload:
    """What a step does: the model's groups and widths, and the batch."""

    layout: ModelLayout
    dims: ModelDims
    batch: int
    seq: int
    unit: str = "block"  # how finely ``layout`` cuts the blocks
    blocks: int | None = None  # decoder blocks (None: one unit each)
    directions: int = 1
    estimator: str = "two-sided"
    cuda_graphs: bool = False  # whole blocks' perturbed forwards replayed from CUDA graphs (finer units run eagerly)

    @property
    def probes(self) -> int:
        return probe_count(self.estimator, self.directions)

    @property
    def perturbed_probes(self) -> int:
        """Probes on a perturbed copy (a one-sided step's forward at θ reads the weights)."""
        return 2 * self.directions if self.estimator == "two-sided" else self.directions

    @property
    def graphed_probes(self) -> int:
        """Probes whose forward replays from a CUDA graph: the perturbed ones, with graphs and whole blocks."""
        return self.perturbed_probes if self.cuda_graphs and self.unit == "block" else 0

    def host_s(self, profile: GPUProfile) -> float:
        """Seconds the host takes to issue a unit's compute task on ``profile``."""
        return profile.host_s(self.probes, self.graphed_probes, self.unit, self.units_per_block)

    @property
    def matmul_streams(self) -> int:
        """Streams that run matmuls: the compute lane's, and with graphs the one they are captured on."""
        return 2 if self.graphed_probes else 1

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def units_per_block(self) -> float:
        return self.layout.num_units / (self.blocks or self.layout.num_units)

    @property
    def unit_numel(self) -> float:
        """Elements of the mean streamable unit."""
        return sum(g.numel for g in self.layout.streamable) / self.layout.num_units

    @property
    def update_bytes(self) -> int:
        """Bytes one update of a block moves per parameter, besides drawing z (with several
        directions: each one's z read into the float32 sum, which is written and read again).
        Read the masters and z, write the masters, whichever the rounding: on a GPU with Triton
        (CUDA builds of torch on Linux bring it) a 16-bit update is one kernel (``zo/fused.py``;
        measured on an H200: an opt-13b block's stochastic update 0.99 ms, 7.9 ms as tensor
        operations, which this does not model)."""
        itemsize = self.layout.streamable[0].itemsize
        return 3 * itemsize + (0 if self.directions == 1 else 4 + self.directions * (itemsize + 8))

    def compute_task_bytes(self) -> float:
        """Bytes a unit's compute task moves besides its forwards: a draw of z and a perturbed copy
        (read θ and z, write) per perturbed probe, one update (with several directions, its
        draws too)."""
        itemsize = self.layout.streamable[0].itemsize
        draws = 0 if self.directions == 1 else self.directions * itemsize
        return self.unit_numel * (4 * itemsize * self.perturbed_probes + draws + self.update_bytes)


@dataclass(frozen=True, slots=True)
class Prediction:
    policy: str
    plan: Plan
    memory: dict[str, int]  # the parts of gpu_bytes
    gpu_bytes: int
    step_s: float
    tokens_per_s: float
    floor_tokens_per_s: float
    paces: dict[str, float]  # seconds of a streamed unit's upload ("the link"), its task on "the GPU", on "the host"
    chosen: Policy | None = None  # the policy predicted, to run it

    @property
    def bound_by(self) -> str:
        """What sets a streamed unit's pace: the longest of ``paces``."""
        return max(self.paces, key=self.paces.__getitem__)

    @property
    def ratio_to_floor(self) -> float:
        return self.tokens_per_s / self.floor_tokens_per_s

    def summary(self) -> dict[str, Any]:
        return {
            "policy": self.policy, "gpu_bytes": self.gpu_bytes, "step_s": self.step_s,
            "tokens_per_s": self.tokens_per_s, "floor_tokens_per_s": self.floor_tokens_per_s,
            "ratio_to_floor": self.ratio_to_floor, "bound_by": self.bound_by, "unit_s": self.paces,
            "memory": self.memory,
        }  # fmt: skip


def forward_flops(work: Workload) -> float:
    """Flops of one forward of a unit: two per parameter and token, and its share of its block's
    causal attention."""
    attention = 2 * work.batch * work.seq**2 * work.dims.hidden / work.units_per_block
    return 2 * work.unit_numel * work.tokens + attention


def profile_from_card(
    name: str, card: Mapping[str, Any], work: Workload, gpu_memory_gb: float, duplex: float, source: str
) -> GPUProfile:
    """The profile that ``figures`` turns back into the card's times: link speeds as measured, the
    compute rate from both forwards, the memory rate from the rest of the compute task (timed on
    its own, so a task timed no longer than its forwards on a noisy host still gives one; a card
    from before that: the task less its forwards), the
    host's time per task and per probe as the card split it, what a forward replayed from a CUDA
    graph saves a probe (the card's eager forward's host time less the replay's), per piece of
    the head's loss, and cuBLAS's workspace a stream (a card without them: not modelled).

    The card times whole blocks, so ``work`` must stream whole blocks: a finer unit's flops over
    a block's time would give a fraction of the rate. A card of a block cut into finer units
    (``bench --unit``) also gives the host's time for the cut block's tasks (``host_cut_ms``)."""
    if work.unit != "block":
        raise ValueError(f"the card times whole blocks: give a Workload of whole blocks, not of {work.unit!r} units")
    forward_s, task_s = card["dual_forward_ms"] / 1e3, card["compute_task_ms"] / 1e3
    rest_s = card["compute_rest_ms"] / 1e3 if "compute_rest_ms" in card else task_s - forward_s
    parts: Mapping[str, float] = card.get("host_parts_ms", {})
    graph_saving = max(0.0, parts["forward"] - parts["graphed forward"]) if "graphed forward" in parts else 0.0
    if rest_s <= 0:
        raise ValueError(f"the card's compute task ({task_s * 1e3:.3f} ms) is not longer than its forwards")
    return GPUProfile(
        name, upload_gb_s=card["upload_gb_s"], offload_gb_s=card["offload_gb_s"], duplex=duplex,
        tflops=2 * forward_flops(work) / forward_s / 1e12,
        memory_gb_s=work.compute_task_bytes() / rest_s / 1e9,
        gpu_memory_gb=gpu_memory_gb, host_task_ms=card.get("host_task_ms", 0.0),
        host_probe_ms=card.get("host_probe_ms", 0.0), host_piece_ms=card.get("host_piece_ms", 0.0),
        host_graph_saving_ms=graph_saving, blas_workspace_mib=card.get("blas_workspace_mib", 0.0), source=source,
        host_cut_ms={card["unit"]: card["unit_tasks_enqueue_ms"]} if "unit_tasks_enqueue_ms" in card else {},
    )  # fmt: skip


def gpu_compute_s(work: Workload, profile: GPUProfile) -> float:
    """Seconds of a unit's compute task on the GPU: its forwards at the compute rate, the bytes its
    draws, perturbed copies and update move at the memory rate."""
    forwards = work.probes * forward_flops(work) / (profile.tflops * 1e12)
    return forwards + work.compute_task_bytes() / (profile.memory_gb_s * 1e9)


def figures(work: Workload, profile: GPUProfile) -> tuple[OpFigures, float]:
    """Seconds of a unit's upload, compute task and offload, and the head; and of one extra update.
    A compute task takes the longer of the GPU's time and the host's to issue it (the GPU runs
    behind the host, never ahead)."""
    params, itemsize = work.unit_numel, work.layout.streamable[0].itemsize
    memory = profile.memory_gb_s * 1e9
    dims = work.dims
    head_gpu_s = work.probes * 2 * work.tokens * dims.hidden * dims.vocab / (profile.tflops * 1e12)
    pieces = loss_pieces(dims.vocab, dims.hidden, work.tokens, fused_itemsize=itemsize)  # the loss kernel's
    head_host_s = work.probes * pieces * profile.host_piece_ms / 1e3
    op = OpFigures(
        upload_s=params * itemsize / (profile.upload_gb_s * 1e9),
        compute_s=max(gpu_compute_s(work, profile), work.host_s(profile)),
        offload_s=params * itemsize / (profile.offload_gb_s * 1e9),
        head_s=max(head_gpu_s, head_host_s),
    )
    return op, params * (itemsize * work.directions + work.update_bytes) / memory  # the draws, then the update


def predict(work: Workload, profile: GPUProfile, policy: Policy, name: str | None = None) -> Prediction:
    """The GPU memory and the mean steady step time (over an offload cycle) of ``policy``."""
    layout = work.layout
    plan = policy.plan(layout)
    parts = layout.breakdown(plan)
    memory = {
        "kept on the device (embed_head; perturbed a chunk at a time)": parts.kept,
        "resident units": parts.resident,
        "streaming slots": parts.slots,
        "working buffers (a perturbed copy)": parts.working,
        "activations": _activations(work),
        "cuBLAS's workspaces (one a stream that runs matmuls)": _workspaces(work, profile),
    }
    op, update_s = figures(work, profile)
    cycle = plan.offload_every
    timeline = simulate(
        layout.num_units, op.upload_s, op.compute_s, op.offload_s, PlanGiven(plan), head_s=op.head_s,
        steps=2 * cycle + 1, duplex=profile.duplex, update_s=update_s,
        unit_sizes=[group.numel for group in layout.streamable],
    )  # fmt: skip
    starts = [mark.start for mark in timeline.steps]  # a step starts when the one before returns
    step_s = (starts[2 * cycle] - starts[cycle]) / cycle  # the second cycle: steps overlapping steps
    gpu_s = gpu_compute_s(work, profile)
    floor = replace(op, compute_s=gpu_s).upload_floor(layout.num_units)  # the link and the GPU
    paces = {"the link": op.upload_s, "the GPU": gpu_s, "the host": work.host_s(profile)}
    return Prediction(name or str(policy), plan, memory, sum(memory.values()), step_s, work.tokens / step_s,
                      work.tokens / floor, paces, policy)  # fmt: skip


@dataclass(frozen=True, slots=True)
class PlanGiven:
    """A policy that returns a plan already made (the simulator asks a policy)."""

    fixed: Plan

    def plan(self, layout: ModelLayout) -> Plan:
        return self.fixed


def candidates(work: Workload, profile: GPUProfile, gpu_bytes: int) -> list[tuple[str, Policy]]:
    """Every policy the search tries for ``work``'s unit: each depth and offload interval
    streamed, and with as many units resident as ``gpu_bytes`` leaves room for."""
    tried: list[tuple[str, Policy]] = []
    unit = "" if work.unit == "block" else f", unit={work.unit!r}"
    for depth in DEPTHS:
        for every in OFFLOAD_EVERY:
            offload = "" if every == 1 else f", offload_every={every}"
            tried.append((f"FixedDepth({depth}{offload}{unit})", FixedDepth(depth, every, work.unit)))
            streaming = predict_memory(work, Plan(depth, offload_every=every), profile)
            budget = work.layout.breakdown(Plan(depth)).units + gpu_bytes - streaming
            if budget > 0:
                name = f"MemoryBudget({show_size(budget)}, depth={depth}, offload_every={every}{unit})"
                tried.append((name, MemoryBudget(budget, depth, every, work.unit)))
    return tried


def _activations(work: Workload) -> int:
    """On CUDA: fused attention, no materialised scores."""
    return activation_bytes(work.dims, work.batch, work.seq, work.layout.compute_itemsize, attention_scores=False,
                            paused=work.unit != "block", probes=work.probes)  # fmt: skip


def _workspaces(work: Workload, profile: GPUProfile) -> int:
    return round(profile.blas_workspace_mib * 2**20) * work.matmul_streams


def predict_memory(work: Workload, plan: Plan, profile: GPUProfile) -> int:
    """GPU bytes of ``plan`` on ``profile``'s GPU: the memory model's buffers, the activations, cuBLAS's workspaces."""
    return work.layout.bytes_needed(plan) + _activations(work) + _workspaces(work, profile)


def best(works: Workload | Sequence[Workload], profile: GPUProfile, gpu_bytes: int) -> Prediction | None:
    """The fastest candidate whose GPU memory fits in ``gpu_bytes`` (None if none does), over
    ``works``: the same model cut into each unit (``UNIT_KINDS``). Among those within 0.1% of the
    fastest (a compute-bound step is as fast streamed as resident, on paper): the coarsest unit,
    then the most units resident (fewer bytes over a link the model may think faster than it is),
    then the least memory."""
    fitting = []
    for work in [works] if isinstance(works, Workload) else works:
        for name, policy in candidates(work, profile, gpu_bytes):
            try:
                if predict_memory(work, policy.plan(work.layout), profile) > gpu_bytes:
                    continue  # does not fit: not worth simulating
            except ValueError:  # a budget too small for its depth
                continue
            fitting.append((predict(work, profile, policy, name), -UNIT_KINDS.index(work.unit)))
    if not fitting:
        return None
    fastest = max(p.tokens_per_s for p, _ in fitting)
    ties = [(p, coarse) for p, coarse in fitting if p.tokens_per_s >= 0.999 * fastest]
    return max(ties, key=lambda t: (t[1], len(t[0].plan.resident), -t[0].gpu_bytes))[0]
