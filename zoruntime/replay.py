"""``zoruntime replay``: rebuild fine-tuned weights from the base weights and the step journal alone.

Each journal record holds what an update needs (its seed, projected gradient, lr and weight
decay); z is regenerated from the seed, one draw per group on the chosen device, and the
update is applied with the same arithmetic as training, in step order. On the same kind of
device the result equals the trained weights bit for bit. A 1,000-step journal is about
200 KB: MeZO's storage-efficient checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from .data.tokenizer import ByteTokenizer
from .journal import Record, read_journal
from .models.groups import adopt_into_flat
from .models.init import load_pretrained_opt
from .models.opt import OPTAdapter
from .zo.directions import DirectionSampler
from .zo.update import PendingUpdate, apply_update


@torch.no_grad()
def replay(model: nn.Module, records: list[Record], device: torch.device | str = "cpu") -> int:
    """Apply every non-skipped record to ``model`` (in place, on ``device``); returns how many."""
    adapter = OPTAdapter(model)
    device = torch.device(device)
    sampler = DirectionSampler(device)
    groups = adapter.groups()
    flats = [
        adopt_into_flat(lay, params, torch.empty(lay.numel, dtype=lay.dtype, device=device)) for lay, params in groups
    ]
    z = torch.empty(max(lay.numel for lay, _ in groups), dtype=groups[0][0].dtype, device=device)
    applied = 0
    for record in sorted(records, key=lambda r: r.step):
        if record.skipped:
            continue
        grad = torch.tensor(record.projected_grad, dtype=torch.float32, device=device)
        update = PendingUpdate.from_gradient(record.step, record.seed, record.lr, record.weight_decay, grad)
        for (layout, _), flat in zip(groups, flats, strict=True):
            direction = sampler.draw(record.seed, layout.group, z[: layout.numel])
            apply_update(flat, direction, update, layout.decayed_views(flat))
        applied += 1
    return applied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zoruntime replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the model the run started from (a folder or hub name)")
    parser.add_argument("--journal", required=True, help="journal.jsonl of the run")
    parser.add_argument("--out", required=True, help="folder for the rebuilt model")
    parser.add_argument("--device", default="cpu", help="where to apply the updates: the kind the run trained on")
    args = parser.parse_args(argv)
    try:
        if not Path(args.journal).is_file():
            raise ValueError(f"--journal {args.journal} does not exist")
        records = read_journal(args.journal)
        model = load_pretrained_opt(args.base)
    except ValueError as error:
        print(f"zoruntime replay: error: {error}", file=sys.stderr)
        return 2
    count = replay(model, records, args.device)
    nn.Module.to(model, "cpu")
    model.save_pretrained(args.out, state_dict={k: v.detach().clone() for k, v in model.state_dict().items()})
    if ByteTokenizer.saved_in(args.base):
        ByteTokenizer().save_pretrained(args.out)
    print(f"replayed {count} updates ({len(records) - count} skipped steps) onto {args.base}; saved {args.out}")
    return 0
