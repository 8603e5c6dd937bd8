"""Your own data as a task: JSON Lines, CSV or Parquet files (or a dataset on the hub, when
online) read through ``datasets``, checked up front, made into one of four tasks.

- ``classify``: ``template`` (with ``{text}``) then each label's word, scored as candidates, as
  MeZO prompts SST-2; loss: cross-entropy over the candidates; dev metric: accuracy.
- ``choice``: a question with options (a list field); the options are the candidates and the
  answer (an option's text, or a number: its index) the gold one; accuracy. Every record offers
  as many options.
- ``lm``: a text field (or a plain text file), the causal-LM loss on every token.
- ``generate``: a prompt field and a target field; the loss on the target's tokens only.

Without ``--dev``, the last tenth of the training examples is the dev set. Every problem (a file
that is not there or is empty, a field the records lack, a label not among ``--labels``, a
template without ``{text}``) is one ``ValueError`` naming it. Knows records and tokenizers;
nothing of models or runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .hub import offline_unless_reachable
from .lm import LMData
from .sst2 import (
    Tokenizer,
    candidate_accuracy,
    candidate_loss,
    candidate_rows,
    keep_right,
    padded,
    scored_batch,
)
from .tasks import ExampleTask, Task

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FILE_TASKS = ("classify", "choice", "lm", "generate")


def read_records(where: str) -> list[dict[str, Any]]:
    """The records of a local file (by its suffix) or, for a name that is not a file, the train
    split of a hub dataset."""
    import datasets

    datasets.utils.logging.disable_progress_bar()
    path = Path(where)
    try:
        if path.suffix in FORMATS:
            if not path.is_file():
                raise ValueError(f"{where} does not exist")
            if path.stat().st_size == 0:
                raise ValueError(f"{where} is empty")
            loaded: Any = datasets.load_dataset(FORMATS[path.suffix], data_files=str(path), split="train")
        elif path.exists():
            raise ValueError(f"{where}: give a .jsonl, .json, .csv or .parquet file")
        else:
            with offline_unless_reachable():
                loaded = datasets.load_dataset(where, split="train")
    except ValueError:
        raise
    except Exception as error:  # the library's own errors: a malformed file, no network, an unknown name
        hub = (
            ""
            if path.suffix in FORMATS
            else (
                f'; for a hub dataset, download it once on a machine with network (python -c "import datasets; '
                f"datasets.load_dataset('{where}')\") and run with HF_DATASETS_OFFLINE=1"
            )
        )
        raise ValueError(
            f"could not read {where} ({type(error).__name__}: {str(error).splitlines()[0]}){hub}"
        ) from None
    records = list(loaded)
    if not records:
        raise ValueError(f"{where} has no records")
    return records


def _field(records: Sequence[dict[str, Any]], name: str, option: str, where: str) -> list[Any]:
    missing = [i for i, record in enumerate(records) if name not in record or record[name] is None]
    if missing:
        fields = ", ".join(sorted(records[missing[0]]))
        raise ValueError(f"{where}, record {missing[0] + 1}: no field {name!r} (give {option}; its fields: {fields})")
    return [record[name] for record in records]


def parse_labels(text: str) -> dict[str, str]:
    """``"negative:terrible,positive:great"`` → {label: the word that stands for it}."""
    pairs = [part.partition(":") for part in text.split(",")]
    if any(not label.strip() or not colon or not word.strip() for label, colon, word in pairs):
        raise ValueError(f"--labels {text!r}: give label:word pairs, e.g. negative:terrible,positive:great")
    labels, words = [label.strip() for label, _, _ in pairs], [word.strip() for _, _, word in pairs]
    for kind, names in (("label", labels), ("word", words)):
        twice = next((name for i, name in enumerate(names) if name in names[:i]), None)
        if twice is not None:  # a label twice hides one; a word twice cannot tell its labels apart
            raise ValueError(f"--labels {text!r}: the {kind} {twice!r} comes twice; give each label its own word")
    return dict(zip(labels, words, strict=True))


def check_template(template: str) -> None:
    if "{text}" not in template:
        raise ValueError(f"--template {template!r} has no {{text}}: say where the text goes, e.g. '{{text}} It was'")
    try:
        template.format(text="")
    except (KeyError, IndexError, ValueError):
        raise ValueError(
            f"--template {template!r}: only {{text}} may stand in braces (write {{{{ and }}}} for a brace itself)"
        ) from None


def _split(train: list[Any], dev: list[Any] | None) -> tuple[list[Any], list[Any]]:
    if dev is not None:
        return train, dev
    cut = max(1, len(train) - max(1, len(train) // 10))
    if cut >= len(train):
        raise ValueError("too few records to keep a tenth for dev: give --dev FILE or more records")
    return train[:cut], train[cut:]


def file_task(kind: str, options: Any, tokenizer: Tokenizer) -> Task:
    """The task ``kind`` on ``options.data`` (and ``options.dev``), fields and prompts as
    ``options`` says (``zoruntime train``'s options)."""
    if kind not in FILE_TASKS:
        raise ValueError(f"unknown file task {kind!r}; choose {', '.join(FILE_TASKS)}")
    files = [options.data] + ([options.dev] if options.dev else [])
    if kind == "lm" and _plain_text(options.data):
        text = Path(options.data).read_text(encoding="utf-8", errors="replace")
        cut = int(len(text) * 0.9)
        if options.dev is None:
            train_ids, dev_ids = tokenizer.encode(text[:cut]), tokenizer.encode(text[cut:])
        elif _plain_text(options.dev):
            train_ids, dev_ids = tokenizer.encode(text), tokenizer.encode(Path(options.dev).read_text(encoding="utf-8"))
        else:  # dev records: their text field, as --data records would be read
            train_ids = tokenizer.encode(text)
            dev_ids = [t for row in _lm(read_records(options.dev), options.dev, options, tokenizer) for t in row]
        return LMData(train_ids, dev_ids, options.max_length, options.batch_size, options.seed)
    records = [read_records(where) for where in files]
    builders = {"classify": _classify, "choice": _choice, "lm": _lm, "generate": _generate}
    built = [builders[kind](rs, where, options, tokenizer) for rs, where in zip(records, files, strict=True)]
    train, dev = _split(built[0], built[1] if len(built) > 1 else None)
    if kind in ("classify", "choice"):
        _check_candidates(train + dev, files, options.max_length, tokenizer, "." if kind == "classify" else "")
    if kind == "lm":
        return LMData([t for row in train for t in row], [t for row in dev for t in row], options.max_length,
                      options.batch_size, options.seed)  # fmt: skip
    if kind == "generate":
        pad = tokenizer.pad_token_id
        return ExampleTask(train, dev, lambda rows: padded(rows, pad), options.batch_size, options.seed)
    candidates = {len(c) for _, c, _ in train + dev}
    length = options.max_length

    def batch(examples: Sequence[tuple[str, Sequence[str], int]]) -> dict[str, Any]:
        return scored_batch(examples, tokenizer, length, suffix="." if kind == "classify" else "")

    return ExampleTask(train, dev, batch, options.batch_size, options.seed, candidate_loss,
                       ("accuracy", candidate_accuracy), max(candidates))  # fmt: skip


def _plain_text(where: str) -> bool:
    """A local file that is not records (JSON Lines, CSV, Parquet): its text is the corpus."""
    return Path(where).suffix not in FORMATS and Path(where).is_file()


def _check_candidates(
    examples: Sequence[tuple[str, Sequence[str], int]],
    files: Sequence[str],
    max_length: int,
    tokenizer: Tokenizer,
    suffix: str,
) -> None:
    """Every example offers as many candidates (a batch scores them as one table), and each
    candidate leaves room for a prompt within ``max_length``: refused up front, not at the batch
    that would meet it mid-run."""
    counts = {len(candidates) for _, candidates, _ in examples}
    if len(counts) > 1:
        first = len(examples[0][1])
        other = next(i for i, (_, candidates, _) in enumerate(examples) if len(candidates) != first)
        raise ValueError(
            f"{' and '.join(files)}: every record needs as many options (a batch scores them together); the first "
            f"has {first}, example {other + 1} has {len(examples[other][1])}"
        )
    for candidate in dict.fromkeys(c for _, candidates, _ in examples for c in candidates):
        try:  # the row a batch would make of it, with the shortest prompt
            candidate_rows("", [candidate], tokenizer, max_length, suffix)
        except ValueError:
            raise ValueError(
                f"the option {candidate[:40]!r} leaves no room for its prompt within --max-length {max_length}: give "
                "a larger --max-length or shorter options"
            ) from None


def _classify(records: list[dict[str, Any]], where: str, options: Any, _tokenizer: Tokenizer) -> list[Any]:
    check_template(options.template)
    if not options.labels:
        raise ValueError("--task classify needs --labels, e.g. negative:terrible,positive:great")
    words = parse_labels(options.labels)
    texts = _field(records, options.text_field, "--text-field", where)
    labels = [str(label) for label in _field(records, options.label_field, "--label-field", where)]
    names = list(words)
    for i, label in enumerate(labels):
        if label not in words:
            raise ValueError(f"{where}, record {i + 1}: label {label!r} is not one of --labels ({', '.join(names)})")
    return [(options.template.format(text=str(t).strip()), list(words.values()), names.index(label))
            for t, label in zip(texts, labels, strict=True)]  # fmt: skip


def _choice(records: list[dict[str, Any]], where: str, options: Any, _tokenizer: Tokenizer) -> list[Any]:
    questions = _field(records, options.text_field, "--text-field", where)
    choices = _field(records, options.options_field, "--options-field", where)
    answers = _field(records, options.label_field, "--label-field", where)
    examples = []
    for i, (question, offered, answer) in enumerate(zip(questions, choices, answers, strict=True)):
        if not isinstance(offered, list) or len(offered) < 2:
            raise ValueError(f"{where}, record {i + 1}: {options.options_field!r} must list two or more options")
        offered = [str(o) for o in offered]
        gold = _gold(answer, offered)
        if gold is None:
            raise ValueError(f"{where}, record {i + 1}: answer {answer!r} is neither an option nor an option's index")
        examples.append((str(question).strip(), offered, gold))
    return examples


def _gold(answer: object, offered: list[str]) -> int | None:
    """The index of the answer among ``offered``: a number is an index, a string the option's
    text (else, written in digits, an index); None for neither (or a bool)."""
    if isinstance(answer, bool):
        return None
    text = str(answer)
    if isinstance(answer, int):  # a number beyond the options may still be one's text (a CSV's "4")
        return answer if 0 <= answer < len(offered) else offered.index(text) if text in offered else None
    if text in offered:
        return offered.index(text)
    return int(text) if text.isdigit() and int(text) < len(offered) else None


def _lm(records: list[dict[str, Any]], where: str, options: Any, tokenizer: Tokenizer) -> list[Any]:
    texts = _field(records, options.text_field, "--text-field", where)
    return [tokenizer.encode(str(text) + "\n") for text in texts]


def _generate(records: list[dict[str, Any]], where: str, options: Any, tokenizer: Tokenizer) -> list[Any]:
    prompts = _field(records, options.prompt_field, "--prompt-field", where)
    targets = _field(records, options.target_field, "--target-field", where)
    rows = []
    for i, (prompt, target) in enumerate(zip(prompts, targets, strict=True)):
        head = tokenizer.encode(str(prompt), add_special_tokens=True)
        tail = tokenizer.encode(str(target), add_special_tokens=False)
        room = options.max_length - len(tail)
        if room < 1 or not tail:
            raise ValueError(f"{where}, record {i + 1}: the target is empty or longer than --max-length "
                             f"{options.max_length}")  # fmt: skip
        head = keep_right(head, room, tokenizer)
        rows.append((head + tail, [-100] * len(head) + tail))
    return rows
