"""``directions="auto"``: how many directions a step can evaluate while a plan's blocks cross the
link, predicted by the planner. No torch.

A streamed, transfer-bound step leaves the compute lane idle while the next block uploads; the
forwards of more directions fill that time for free until compute catches up with the
transfers. ``auto_directions`` predicts the step time of ``plan`` for q = 1, 2, ... on the
profile, and answers the largest q whose step is no slower than MeZO's (one direction,
two-sided) by more than ``HIDDEN_WITHIN``. A one-sided estimator needs ``ONE_SIDED_FEWEST``
directions at least, and gets them even where they do not hide. Predictions, not measurements:
the host's time to issue each probe counts where the profile has it
(``GPUProfile.host_probe_ms``), so a small model, whose blocks cross the link faster than Python
issues their forwards, gets few.
"""

from __future__ import annotations

from dataclasses import replace

from ..policies.base import Plan
from .planner import PlanGiven, Workload, predict
from .profiles import GPUProfile, profile_for_device

MAX_DIRECTIONS = 16
HIDDEN_WITHIN = 0.02
"""How much slower than MeZO's step a step of more directions may be predicted and still count
as hidden under the transfers."""


ONE_SIDED_FEWEST = 3
"""The fewest directions the one-sided estimator takes. Its step is divided by σ, the spread of
the directions' projected gradients; σ of two is ``|g_1 − g_2| / √2``, near 0 as often as the
two are near each other, and the step then explodes: with two directions ``bench/directions``
diverged on every seed, at every learning rate, on both tasks; with three it reached the target
on every seed of both (``docs/results/2026-11-27-cpu-directions-q3.log``)."""


def fewest_directions(estimator: str) -> int:
    """The fewest directions ``estimator`` takes (one-sided: ``ONE_SIDED_FEWEST``)."""
    return ONE_SIDED_FEWEST if estimator == "one-sided" else 1


def too_few_directions(estimator: str, directions: int) -> str | None:
    """Why ``directions`` are too few for ``estimator``, with the fix; None when they are enough."""
    fewest = fewest_directions(estimator)
    if directions >= fewest:
        return None
    return (f"estimator='{estimator}' needs directions >= {fewest}, got {directions}: its step is divided by the "
            "spread of the directions' projected gradients, which two or fewer make unstable (with 2 it diverged "
            f"in bench/directions); pass directions={fewest} or more, or estimator='two-sided'")  # fmt: skip


def auto_directions(work: Workload, profile: GPUProfile, plan: Plan, estimator: str) -> int:
    """The largest q (at most ``MAX_DIRECTIONS``) whose predicted step time for ``plan`` is within
    ``HIDDEN_WITHIN`` of one two-sided direction's; at least ``fewest_directions(estimator)``."""
    least = fewest_directions(estimator)
    policy = PlanGiven(plan)

    def step_s(q: int, kind: str) -> float:
        return predict(replace(work, directions=q, estimator=kind), profile, policy).step_s

    limit = step_s(1, "two-sided") * (1 + HIDDEN_WITHIN)
    chosen = least
    for q in range(least + 1, MAX_DIRECTIONS + 1):
        if step_s(q, estimator) > limit:
            break
        chosen = q
    return chosen


def directions_for(work: Workload, plan: Plan, estimator: str, profile: GPUProfile | None, gpu_name: str | None) -> int:
    """A run's ``directions="auto"``: ``auto_directions`` on ``profile``, else on the built-in
    profile of the GPU named ``gpu_name`` (an error naming the fix when it has none); with
    neither (a CPU, where nothing crosses a link to hide forwards under) the fewest."""
    if profile is None and gpu_name is not None:
        profile = profile_for_device(gpu_name)
        if profile is None:
            raise ValueError(
                f"directions='auto' predicts from a GPU profile, and the {gpu_name} has no built-in one: write one "
                "with `zoruntime bench --save-profile FILE` and pass Runtime(..., profile=FILE) (zoruntime train "
                "--gpu-profile FILE), or give directions a number"
            )
    if profile is None:
        return fewest_directions(estimator)
    return auto_directions(work, profile, plan, estimator)
