"""``zoruntime train``: fine-tune an OPT or Llama-family model with the offloaded runtime, from the command line.

Writes to ``--out``: the model as a Hugging Face folder (``save_pretrained``, safetensors) with
its tokenizer, the resolved configuration with the base model's fingerprint (``zoruntime.json``),
the step journal (``journal.jsonl``), checkpoints (the last step always), a copy of the base for
the built-in default (``base/``) and, with ``--trace``, the timeline (``trace.json``,
``timeline.png``). Every option, the policy and the memory the batch needs are checked before
anything is written; a folder that holds another run is refused (``--resume`` or
``--overwrite``). Bad input ends with a one-line error and exit code 2; Ctrl-C checkpoints the
last completed step and exits with 130.

The command, module by module, each knowing only what it needs:

- ``options``: the options, ``TrainConfig``, and the checks of each option on its own (the
  ``--help`` text, with what the command trains by default, is its docstring);
- ``model``: loading and saving the model and tokenizer, the ``Runtime`` with the policy and the
  batch checked against the model and memory;
- ``data``: what is trained on (causal LM or SST-2) and the dev evaluation;
- ``loop``: the run folder, resume, the step loop, checkpoints and the summary (``train``);
- here: ``main``, the command line to an exit code (2: bad input, 130: Ctrl-C).
"""

from __future__ import annotations

import sys

import torch

from ..engine import run
from ..runs import RunFolderError
from .loop import Interrupted, train
from .options import TrainConfig, UsageError, parser, resumed_config

__all__ = ["Interrupted", "TrainConfig", "UsageError", "main", "train"]


def main(argv: list[str] | None = None) -> int:
    """``zoruntime train ARGS``: the exit code (0; 2: bad input; 130: Ctrl-C)."""
    args = parser().parse_args(argv)
    try:
        if args.overwrite and args.resume:
            raise UsageError("--overwrite starts a run again and --resume continues one: give one of them")
        config = resumed_config(args, argv) if args.resume else TrainConfig(**vars(args))
        if not config.progress:  # transformers' loading and shard-writing bars too
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        run(train(config))
    except (UsageError, RunFolderError) as error:
        print(f"zoruntime train: error: {error}", file=sys.stderr, flush=True)
        return 2
    except Interrupted as stop:
        print(f"zoruntime train: {stop}", file=sys.stderr, flush=True)
        return 130
    except KeyboardInterrupt:  # before the run loop: nothing was trained, nothing to keep
        print("zoruntime train: interrupted before the first step; nothing was trained", file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
