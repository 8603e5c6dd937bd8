"""``zoruntime replay``: rebuild fine-tuned weights from the base weights and the step journal alone.

Each journal record holds what an update needs (its seed, the projected gradient of each of its
directions and the estimator that turns them into the step, lr and weight decay); z is
regenerated from the seed, one draw per group and direction on the chosen device, and the
update is applied with the same arithmetic as training, in step order. On the same kind of
device the result equals the trained weights bit for bit. A journal written under another
direction scheme (``zo.directions.DIRECTION_SCHEME``; scheme 1 journals record none) is refused
in one line: its seeds would regenerate other directions. A 1,000-step journal is about
200 KB: MeZO's storage-efficient checkpoint.

``zoruntime replay --run DIR --out OUT`` needs nothing but the run folder: its configuration
names the base (a model's name or path, or the copy of the built-in default in ``DIR/base``)
and the dtype, and a base whose weights' fingerprint is not the one recorded is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data.tokenizer import ByteTokenizer
from .journal import Record, read_header, read_journal
from .models.adapter import adapter_for
from .models.fingerprint import weights_fingerprint
from .models.freeze import freeze
from .models.groups import adopt_into_flat
from .models.init import load_pretrained, save_pretrained
from .planning.memory import STEP_SPAN_ELEMENTS
from .runs import RunFolderError, RunLock, check_writable, read_configuration
from .train.options import UsageError, resolve_device
from .zo.directions import DirectionSampler
from .zo.estimator import coefficients
from .zo.update import PendingUpdate, Rounding, update_group


@torch.no_grad()
def replay(model: nn.Module, records: list[Record], device: torch.device | str = "cpu", unit: str = "block") -> int:
    """Apply every non-skipped record to ``model`` (in place, on ``device``), its blocks cut into
    ``unit``s as the run cut them; returns how many."""
    adapter = adapter_for(model, unit)
    device = torch.device(device)
    sampler = DirectionSampler(device)
    groups = adapter.groups()
    flats = [
        adopt_into_flat(lay, params, torch.empty(lay.numel, dtype=lay.dtype, device=device)) for lay, params in groups
    ]
    numel = max(lay.numel for lay, _ in groups)
    z = torch.empty(numel, dtype=groups[0][0].dtype, device=device)
    summed = torch.empty(min(numel, STEP_SPAN_ELEMENTS), dtype=torch.float32, device=device)
    applied = 0
    for record in sorted(records, key=lambda r: r.step):
        if record.skipped:
            continue
        grads = torch.tensor(record.projected_grads, dtype=torch.float32, device=device)
        coeffs = coefficients(record.estimator, grads)
        update = PendingUpdate.from_gradient(
            record.step, record.seed, record.lr, record.weight_decay, coeffs, Rounding(record.rounding)
        )
        for (layout, _), flat in zip(groups, flats, strict=True):
            if layout.trainable:
                update_group(flat, update, layout, sampler, z[: layout.numel], summed)
        applied += 1
    return applied


def check_every_step(records: list[Record]) -> None:
    """A ValueError unless ``records`` hold every step from 0 once (it names the first missing or
    repeated): replaying a journal without some steps would rebuild other weights than the run's."""
    steps = sorted(r.step for r in records)
    wrong = next((i for i, step in enumerate(steps) if step != i), None)
    if wrong is not None:
        repeated = steps[wrong] < wrong
        raise ValueError(
            f"the journal does not hold every step once from step 0 (step {steps[wrong] if repeated else wrong} is "
            f"{'repeated' if repeated else 'missing'}; its records run from step {steps[0]} to {steps[-1]}): replay "
            "would rebuild other weights than the run trained"
        )


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _replay_error(message: str) -> int:
    print(f"zoruntime replay: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zoruntime replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a run folder (zoruntime train --out): its base, dtype and journal")
    parser.add_argument("--base", help="without --run: the model the run started from (a folder or hub name)")
    parser.add_argument("--journal", help="without --run: journal.jsonl of the run")
    parser.add_argument("--out", required=True, help="folder for the rebuilt model")
    parser.add_argument("--device", default="cpu", help="where to apply the updates: the kind the run trained on")
    args = parser.parse_args(argv)
    if (args.run is None) == (args.base is None and args.journal is None) or (
        args.run is None and (args.base is None or args.journal is None)
    ):
        parser.error("give --run DIR, or both --base and --journal")
    try:
        args.device = resolve_device(args.device)
    except UsageError as error:
        return _replay_error(str(error))
    try:
        check_writable(Path(args.out))
        run_folder = Path(args.run) if args.run else None
        with contextlib.ExitStack() as stack:
            if run_folder is not None:
                if not (run_folder / "zoruntime.json").is_file():
                    raise ValueError(f"--run {run_folder}: no zoruntime.json there; is it the --out folder of a run?")
                stack.enter_context(RunLock(run_folder, "zoruntime replay"))
                config = read_configuration(run_folder)
                journal = run_folder / "journal.jsonl"
                base = str(run_folder / "base") if config.get("base") == "built-in" else config.get("model")
                if base is None:
                    raise ValueError(f"{run_folder} does not record its base model (a run from before bases were kept)")
                expected: dict[str, Any] = {k: config.get(k) for k in ("base_fingerprint", "dtype")}
            else:
                journal = Path(args.journal)
                base = args.base
                expected = {}
            if not journal.is_file():
                raise ValueError(f"the journal {journal} does not exist")
            records = read_journal(journal)
            check_every_step(records)
            header = read_header(journal) or {}
            for key in ("base_fingerprint", "dtype"):  # the run's configuration first, else the journal's header
                expected[key] = expected.get(key) or header.get(key)
            dtype = _DTYPES[expected["dtype"]] if expected.get("dtype") else None
            model = load_pretrained(base, dtype)
            if expected.get("base_fingerprint") and weights_fingerprint(model) != expected["base_fingerprint"]:
                raise ValueError(
                    f"the base {base} is not the model this run started from (its weights' fingerprint differs from "
                    "the one the run recorded); replay needs exactly that base"
                )
            if header.get("freeze"):  # the parts the run did not train get no update here either
                freeze(model, header["freeze"])
            out = stack.enter_context(RunLock(Path(args.out), "zoruntime replay"))
            count = replay(model, records, args.device, header.get("unit", "block"))
            nn.Module.to(model, "cpu")
            save_pretrained(model, out.folder)
            if ByteTokenizer.saved_in(base):
                ByteTokenizer().save_pretrained(out.folder)
    except (ValueError, RunFolderError) as error:
        return _replay_error(str(error))
    print(f"replayed {count} updates ({len(records) - count} skipped steps) onto {base}; saved {args.out}")
    return 0
