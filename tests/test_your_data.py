"""Your own data: JSON Lines, CSV and Parquet records as classify, choice, lm and generate tasks,
each problem refused up front in one line, and a task of your own from a file of yours."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from zoruntime.data.files import file_task
from zoruntime.data.tokenizer import ByteTokenizer
from zoruntime.train import main as train_main
from zoruntime.train.options import TrainConfig

FAST = ["--no-progress", "--no-trace", "--eval-every", "0", "--max-length", "48", "--batch-size", "2", "--steps", "2"]
REVIEWS = [("a gripping, funny film", "positive"), ("dull and far too long", "negative"), ("I loved it", "positive"),
           ("a mess", "negative"), ("warm and clever", "positive"), ("tedious", "negative")]  # fmt: skip
LABELS = "negative:terrible,positive:great"


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _reviews(path: Path) -> Path:
    return _jsonl(path, [{"text": t, "label": label} for t, label in REVIEWS])


def _train(capsys, tmp_path: Path, *args: str) -> tuple[int, dict | None, str]:
    code = train_main([*FAST, "--out", str(tmp_path / "run"), *args])
    summary = tmp_path / "run" / "summary.json"
    return code, json.loads(summary.read_text()) if code == 0 else None, capsys.readouterr().err


def test_classify_json_lines_with_a_template_and_label_words(tmp_path: Path, capsys) -> None:
    data, dev = _reviews(tmp_path / "train.jsonl"), _reviews(tmp_path / "dev.jsonl")
    code, summary, err = _train(capsys, tmp_path, "--task", "classify", "--data", str(data), "--dev", str(dev),
                                "--template", "Review: {text} It was", "--labels", LABELS)  # fmt: skip
    assert code == 0, err
    assert summary is not None and summary["accuracy_after"] in {i / 6 for i in range(7)}
    options = TrainConfig(data=str(data), dev=str(dev), labels=LABELS, template="Review: {text} It was", batch_size=2)
    task = file_task("classify", options, ByteTokenizer())
    batch = task.dev_batches()[0]
    assert batch["label"].tolist() == [1, 0] and batch["input_ids"].shape[0] == 4  # a row per label word
    rows = [bytes(i - 4 for i in row.tolist() if i >= 4).decode() for row in batch["input_ids"][:2]]
    assert rows == ["Review: a gripping, funny film It was terrible.", "Review: a gripping, funny film It was great."]


def test_classify_reads_csv_and_parquet_too(tmp_path: Path, capsys) -> None:
    import datasets

    rows = {"text": [t for t, _ in REVIEWS], "label": [label for _, label in REVIEWS]}
    datasets.Dataset.from_dict(rows).to_csv(str(tmp_path / "r.csv"))
    datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / "r.parquet"))
    for name in ("r.csv", "r.parquet"):
        task = file_task("classify", TrainConfig(data=str(tmp_path / name), labels=LABELS), ByteTokenizer())
        assert len(task.dev_batches()) == 1 and task.rows_per_example == 2
    code, _, err = _train(capsys, tmp_path, "--task", "classify", "--data", str(tmp_path / "r.csv"), "--labels", LABELS)
    assert code == 0, err


def test_choice_scores_each_records_options_and_takes_the_answer_as_text_or_index(tmp_path: Path, capsys) -> None:
    records = [{"question": "The sky is", "options": ["blue", "loud", "salty"], "answer": "blue"},
               {"question": "Fire is", "options": ["cold", "hot", "square"], "answer": 1}] * 3  # fmt: skip
    data = _jsonl(tmp_path / "q.jsonl", records)
    options = TrainConfig(data=str(data), text_field="question", label_field="answer", batch_size=2)
    task = file_task("choice", options, ByteTokenizer())
    batch = task.train_batch(0)
    assert task.rows_per_example == 3 and batch["input_ids"].shape[0] == 6
    assert sorted(task.dev_batches()[0]["label"].tolist()) == [1]  # the last tenth: one record
    code, summary, err = _train(capsys, tmp_path, "--task", "choice", "--data", str(data), "--text-field", "question",
                                "--label-field", "answer")  # fmt: skip
    assert code == 0 and summary is not None and summary["accuracy_after"] in (0.0, 1.0), err


def test_lm_on_a_json_lines_text_field_and_on_a_plain_text_file(tmp_path: Path, capsys) -> None:
    notes = _jsonl(tmp_path / "notes.jsonl", [{"body": f"note {i}: the cat sat on the mat " * 3} for i in range(20)])
    code, summary, err = _train(capsys, tmp_path, "--task", "lm", "--data", str(notes), "--text-field", "body")
    assert code == 0 and summary is not None and summary["metric"] is None, err
    assert not any(key.startswith("accuracy") for key in summary)
    plain = tmp_path / "notes.txt"
    plain.write_text("the cat sat on the mat. " * 60)
    assert train_main([*FAST, "--out", str(tmp_path / "plain"), "--task", "lm", "--data", str(plain)]) == 0


def test_generate_puts_the_loss_on_the_target_alone(tmp_path: Path, capsys) -> None:
    records = [{"prompt": f"Q: {a}+{a}? A:", "target": f" {2 * a}"} for a in range(12)]
    data = _jsonl(tmp_path / "g.jsonl", records)
    task = file_task("generate", TrainConfig(data=str(data), batch_size=3), ByteTokenizer())
    batch = task.dev_batches()[0]
    row, labels = batch["input_ids"][0], batch["labels"][0]
    counted = labels[labels != -100]
    assert bytes(int(i) - 4 for i in counted).decode() == " 22"  # the dev record's target, nothing of its prompt
    assert torch.equal(counted, row[labels != -100])
    code, _, err = _train(capsys, tmp_path, "--task", "generate", "--data", str(data))
    assert code == 0, err


@pytest.mark.parametrize(
    ("records", "extra", "message"),
    [
        ([{"sentence": "x", "label": "positive"}], [], "record 1: no field 'text' (give --text-field; its fields: "
                                                       "label, sentence)"),
        ([{"text": "x", "label": "neutral"}] * 3, [], "record 1: label 'neutral' is not one of --labels (negative, "
                                                      "positive)"),
        (None, [], "is empty"),
        ([{"text": "x", "label": "positive"}], ["--template", "It was"], "--template 'It was' has no {text}"),
        ([{"text": "x", "label": "positive"}], ["--labels", "great"], "--labels 'great': give label:word pairs"),
    ],
)  # fmt: skip
def test_each_problem_with_your_data_is_one_line_before_anything_is_written(
    tmp_path: Path, capsys, records, extra, message
) -> None:
    data = tmp_path / "d.jsonl"
    _jsonl(data, records) if records is not None else data.write_text("")
    code, _, err = _train(capsys, tmp_path, "--task", "classify", "--data", str(data), "--labels", LABELS, *extra)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_options_that_do_not_go_together_are_refused(tmp_path: Path, capsys) -> None:
    for args, message in [
        (["--task", "classify", "--labels", LABELS], "--task classify trains on your records: give --data FILE"),
        (["--task", "sst2", "--data", "x.jsonl"], "--data goes with --task classify, choice, lm or generate"),
        (["--task", "classify", "--data", str(tmp_path / "no.jsonl"), "--labels", LABELS], "no.jsonl does not exist"),
        (["--task", "classify", "--data", str(_reviews(tmp_path / "r.jsonl"))], "--task classify needs --labels"),
        (["--task", "poems"], "unknown --task 'poems'; choose lm, sst2, classify, choice or generate"),
    ]:
        code, _, err = _train(capsys, tmp_path, *args)
        assert code == 2 and message in err, err


def test_a_task_of_your_own_from_a_file_of_yours(tmp_path: Path, capsys) -> None:
    """The protocol in a few lines: examples, a batch function, the loss (None: the causal LM's)."""
    (tmp_path / "mytask.py").write_text(
        "import torch\n"
        "from zoruntime.data.tasks import ExampleTask\n"
        "def make(config, tokenizer):\n"
        "    rows = [tokenizer.encode(f'{n:02d} {n + 1:02d} {n + 2:02d}') for n in range(40)]\n"
        "    batch = lambda rs: {'input_ids': torch.tensor([r[:6] for r in rs])}\n"
        "    return ExampleTask(rows[:30], rows[30:], batch, config.batch_size, config.seed)\n"
        "def wrong(config, tokenizer):\n"
        "    return 42\n"
        "def refuses(config, tokenizer):\n"
        "    raise ValueError('no data for this split')\n"
        "def takes_nothing():\n"
        "    return None\n"
    )
    code, summary, err = _train(capsys, tmp_path, "--task", f"{tmp_path / 'mytask.py'}:make")
    assert code == 0 and summary is not None and summary["dev_loss_after"] > 0, err
    code, _, err = _train(capsys, tmp_path, "--overwrite", "--task", f"{tmp_path / 'mytask.py'}:wrong")
    assert code == 2 and "it returned a int, not a task" in err
    code, _, err = _train(capsys, tmp_path, "--overwrite", "--task", "nowhere_module:make")
    assert code == 2 and "cannot import nowhere_module" in err
    mine = tmp_path / "mytask.py"
    code, _, err = _train(capsys, tmp_path, "--overwrite", "--task", f"{mine}:refuses")
    assert code == 2 and err.endswith(f"error: --task {mine}:refuses: no data for this split\n")  # which task said it
    code, _, err = _train(capsys, tmp_path, "--overwrite", "--task", f"{mine}:takes_nothing")
    assert code == 2 and "takes_nothing must take (config, tokenizer) and return a task" in err


TASK_WITH_A_METRIC = """
import torch
from zoruntime.data.tasks import ExampleTask


def exact_match(logits, batch):
    guesses = logits[:, :-1].argmax(dim=-1)
    return (guesses == batch.input_ids[:, 1:]).all(dim=1).float().mean()


def make(config, tokenizer):
    rows = [tokenizer.encode(f"{n:03d} {n + 1:03d}") for n in range(40)]
    return ExampleTask(rows[:36], rows[36:], lambda rs: {"input_ids": torch.tensor(rs)}, config.batch_size,
                       config.seed, metric=("exact match", exact_match))
"""


def test_a_tasks_own_metric_is_shown_logged_and_summarised_under_its_name(tmp_path: Path, capsys) -> None:
    (tmp_path / "mytask.py").write_text(TASK_WITH_A_METRIC)
    code = train_main([*FAST, "--eval-every", "1", "--out", str(tmp_path / "run"), "--task",
                       f"{tmp_path / 'mytask.py'}:make"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metric"] == "exact match" and summary["exact_match_after"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert f"exact match {summary['exact_match_before']:.4g}" in out  # "before: dev loss ..., exact match 0"
    assert any(line.startswith("exact match ") for line in out.splitlines())  # the end table's row
    before, after = summary["dev_loss_before"], summary["dev_loss_after"]
    assert f"({abs(1 - after / before):.1%} {'lower' if after <= before else 'higher'})" in out
    dev = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    dev = [line for line in dev if line["kind"] == "dev"]
    assert [line["step"] for line in dev] == [0, 1, 2]
    assert all(line["metric"] == "exact match" and "exact_match" in line for line in dev)
    assert "accuracy" not in out and not any("accuracy" in line for line in dev)
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0


def test_a_choice_answer_is_an_options_text_first_and_a_number_its_index(tmp_path: Path) -> None:
    """Options that are numbers themselves: the answer "2" is the option '2' (it was read as the
    index of '3'), a JSON number is an index, and "4" among ["2", "4"] is no longer refused."""
    options = TrainConfig(data=str(tmp_path / "q.jsonl"), dev=str(tmp_path / "q.jsonl"), text_field="q",
                          label_field="answer", batch_size=4)  # fmt: skip
    for answers, gold in ((["2", "4", "0", "6"], [1, 1, 0, 2]), ([2, 4, 0, 1], [2, 1, 0, 1])):  # texts, numbers
        offered = [["1", "2", "3"], ["2", "4", "6"], ["x", "y", "z"], ["2", "4", "6"]]
        _jsonl(
            tmp_path / "q.jsonl", [{"q": "q", "options": o, "answer": a} for o, a in zip(offered, answers, strict=True)]
        )
        assert file_task("choice", options, ByteTokenizer()).dev_batches()[0]["label"].tolist() == gold
    data = tmp_path / "q.jsonl"
    for answer in (True, "7", 7):
        _jsonl(data, [{"q": "q", "options": ["1", "2", "3"], "answer": answer}] * 2)
        with pytest.raises(ValueError, match=f"record 1: answer {answer!r} is neither an option nor an option's index"):
            file_task("choice", options, ByteTokenizer())


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"q": "a", "options": ["x", "y"], "answer": 0}, {"q": "b", "options": ["x", "y", "z"], "answer": 0}] * 3,
         "every record needs as many options (a batch scores them together); the first has 2, example 2 has 3"),
        ([{"q": "a", "options": ["x", "a very long option " * 4], "answer": 0}] * 6,
         "the option 'a very long option a very long option a ' leaves no room for its prompt within "
         "--max-length 48"),
    ],
)  # fmt: skip
def test_choice_records_a_batch_cannot_score_are_one_line_before_the_run(tmp_path: Path, capsys, records, message):
    """They stopped the run with a traceback at the first batch that met them, its folder made."""
    data = _jsonl(tmp_path / "q.jsonl", records)
    code, _, err = _train(capsys, tmp_path, "--task", "choice", "--data", str(data), "--text-field", "q",
                          "--label-field", "answer")  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "run").exists()


def test_a_max_length_beyond_the_models_positions_is_one_line_before_the_run(tmp_path: Path, capsys) -> None:
    from zoruntime.models import random_opt, tiny_opt_config

    folder = tmp_path / "base"
    random_opt(tiny_opt_config(num_hidden_layers=2, max_position_embeddings=32), seed=0).save_pretrained(folder)
    ByteTokenizer().save_pretrained(folder)
    data = _reviews(tmp_path / "r.jsonl")
    code, _, err = _train(capsys, tmp_path, "--model", str(folder), "--task", "classify", "--data", str(data),
                          "--labels", LABELS)  # fmt: skip
    assert code == 2 and "--max-length 48 is longer than the model's 32 positions; give --max-length 32" in err, err
    assert not (tmp_path / "run").exists()


def test_lm_on_a_text_file_reads_dev_records_by_their_text_field(tmp_path: Path) -> None:
    plain = tmp_path / "notes.txt"
    plain.write_text("the cat sat on the mat. " * 60)
    dev = _jsonl(tmp_path / "dev.jsonl", [{"body": "a dog ran. " * 8}] * 2)
    task = file_task(
        "lm", TrainConfig(data=str(plain), dev=str(dev), text_field="body", max_length=16), ByteTokenizer()
    )
    first = bytes(i - 4 for i in task.dev_batches()[0]["input_ids"][0].tolist() if i >= 4).decode()
    assert first == "a dog ran. a dog"  # it was the JSON text itself: '{"body": "a dog ...'


def test_the_dev_loss_of_generate_does_not_depend_on_the_batch_size(tmp_path: Path) -> None:
    """Each batch counts by the tokens it scores (it counted by rows: targets of 1 and 10 tokens
    gave 5.526, 5.543, 5.544 at batch sizes 1, 2, 3)."""
    import zoruntime
    from zoruntime.policies import FixedDepth
    from zoruntime.train.data import build_data, evaluate

    records = [{"prompt": f"P{i}:", "target": " " + "abcdefghij"[: 1 if i % 2 else 10]} for i in range(6)]
    data = _jsonl(tmp_path / "g.jsonl", records)
    model = zoruntime.random_opt(zoruntime.tiny_opt_config(), seed=1)

    async def dev_loss(batch_size: int) -> float:
        task = build_data(TrainConfig(task="generate", data=str(data), dev=str(data), batch_size=batch_size,
                                      max_length=32), ByteTokenizer())  # fmt: skip
        async with zoruntime.Runtime(model, zoruntime.ZOSGD(lr=0.0), policy=FixedDepth(1)) as rt:
            return (await evaluate(rt, task)).loss

    losses = [zoruntime.run(dev_loss(size)) for size in (1, 2, 6)]
    assert losses[0] == pytest.approx(losses[2], rel=1e-6) and losses[1] == pytest.approx(losses[2], rel=1e-6)


class _NoBos(ByteTokenizer):
    """A tokenizer that adds no BOS token (GPT-2 and Qwen2 add none)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return super().encode(text, add_special_tokens=False)


@pytest.mark.parametrize(("tokenizer", "kept"), [(ByteTokenizer(), "ur five six"), (_NoBos(), "our five six")])
def test_a_long_prompt_is_cut_from_the_left_keeping_the_bos_the_tokenizer_adds(tokenizer, kept: str) -> None:
    """Without a BOS the prompt's first token was kept as if it were one: 'xur five six'."""
    from zoruntime.data.sst2 import candidate_rows

    ((ids, _),) = candidate_rows("xne two three four five", ["six"], tokenizer, max_length=12, suffix="")
    assert len(ids) == 12 and (ids[0] == ByteTokenizer.bos_token_id) == (not isinstance(tokenizer, _NoBos))
    assert bytes(i - 4 for i in ids if i >= 4).decode() == kept


def test_generate_cuts_a_long_prompt_keeping_the_bos(tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "g.jsonl", [{"prompt": "xne two three four five", "target": " six"}] * 2)
    task = file_task("generate", TrainConfig(data=str(data), dev=str(data), max_length=12), ByteTokenizer())
    ids = task.dev_batches()[0]["input_ids"][0].tolist()
    assert ids[0] == ByteTokenizer.bos_token_id and bytes(i - 4 for i in ids[1:]).decode() == "ur five six"


def test_lm_reads_a_name_that_is_no_file_as_a_hub_dataset(monkeypatch) -> None:
    """As the other tasks do (it was read as a text file: FileNotFoundError, a traceback)."""
    from zoruntime.data import files

    asked = []
    monkeypatch.setattr(
        files, "read_records", lambda where: asked.append(where) or [{"text": "a b c d e f " * 20}] * 20
    )
    task = file_task("lm", TrainConfig(data="someone/notes", max_length=16), ByteTokenizer())
    assert asked == ["someone/notes"] and task.dev_batches()


def test_a_hub_dataset_that_cannot_be_had_says_what_to_download(monkeypatch) -> None:
    import datasets

    from zoruntime.data.files import read_records

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/notes' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    expected = (
        r"could not read someone/notes \(ConnectionError: .*\); for a hub dataset, download it once "
        r".*load_dataset\('someone/notes'\).* HF_DATASETS_OFFLINE=1"
    )
    with pytest.raises(ValueError, match=expected):
        read_records("someone/notes")


def test_an_unreachable_hub_makes_datasets_work_offline_for_the_call(monkeypatch) -> None:
    """A cached dataset loads, a missing one fails at once (datasets retried for about 30 s)."""
    import datasets
    import huggingface_hub.constants

    from zoruntime.data.files import read_records
    from zoruntime.models import init

    seen = []

    def load(*args, **kwargs):
        seen.append((datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE))
        return [{"text": "cached"}]

    monkeypatch.setattr(datasets, "load_dataset", load)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(init, "hub_reachable", lambda: False)
    assert read_records("someone/notes") == [{"text": "cached"}]
    monkeypatch.setattr(init, "hub_reachable", lambda: True)
    assert read_records("someone/notes") == [{"text": "cached"}]
    assert seen == [(True, True), (False, huggingface_hub.constants.HF_HUB_OFFLINE)]
    assert datasets.config.HF_HUB_OFFLINE is False  # restored
