"""Fine-tune on your own data through the API: a JSON Lines file of reviews, a Hugging Face
tokenizer saved in a local folder, a classification task with MeZO's prompt and label words,
and a Llama-family model, watched by its dev loss (the candidates' cross-entropy) and accuracy.
From a random model a few hundred ZO steps lower the loss; the accuracy takes far longer.

Everything is made here (the reviews, the tokenizer trained on them, a small random model), so
it runs offline; with your own, point ``data`` at your file and load your model and tokenizer
with ``from_pretrained``. The command line does the same in one go:

    zoruntime train --model FOLDER --task classify --data train.jsonl --dev dev.jsonl \\
        --template "{text} It was" --labels "negative:terrible,positive:great"

    python examples/finetune_your_data.py --steps 200
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaTokenizer

import zoruntime
from zoruntime.data.files import file_task

GOOD = ("gripping", "funny", "warm", "clever", "moving", "brilliant")
BAD = ("dull", "tedious", "clumsy", "boring", "flat", "lifeless")


def write_reviews(path: Path, count: int, seed: int) -> Path:
    """``count`` records like {"text": "a warm, clever film", "label": "positive"}."""
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        label = rng.choice(("positive", "negative"))
        words = rng.sample(GOOD if label == "positive" else BAD, 2)
        records.append({"text": f"a {words[0]}, {words[1]} film", "label": label})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def save_tokenizer(folder: Path, corpus: list[str]) -> None:
    """Llama's tokenizer pipeline trained on ``corpus`` and saved: a stand-in for your model's own."""
    trained = LlamaTokenizer().train_new_from_iterator(corpus, vocab_size=300)
    trained.save_pretrained(folder)


async def train(steps: int, lr: float) -> tuple[float, float]:
    folder = Path(tempfile.mkdtemp(prefix="zoruntime-your-data-"))
    data, dev = write_reviews(folder / "train.jsonl", 400, 0), write_reviews(folder / "dev.jsonl", 64, 1)
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    save_tokenizer(folder / "tokenizer", [*texts, "It was terrible. It was great."])
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    options = SimpleNamespace(data=str(data), dev=str(dev), text_field="text", label_field="label",
                              template="{text} It was", labels="negative:terrible,positive:great",
                              max_length=32, batch_size=16, seed=0)  # fmt: skip
    task = file_task("classify", options, tokenizer)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64,
                                                         intermediate_size=128, num_hidden_layers=4,
                                                         num_attention_heads=4, num_key_value_heads=2))  # fmt: skip
    assert task.metric is not None
    name, metric = task.metric
    async with zoruntime.Runtime(model, zoruntime.ZOSGD(lr=lr, eps=1e-2), loss_fn=task.loss_fn) as rt:

        async def dev() -> tuple[float, float]:
            """The candidates' cross-entropy and the accuracy, averaged over the dev batches."""
            batches = task.dev_batches()
            losses = [await rt.evaluate(batch) for batch in batches]
            scores = [await rt.evaluate(batch, metric=metric) for batch in batches]
            return sum(losses) / len(losses), sum(scores) / len(scores)

        before = await dev()
        print(f"dev loss before: {before[0]:.3f}  ({name} {before[1]:.3f})")
        for step in range(steps):
            stats = await rt.step(task.train_batch(step))
            if (step + 1) % 50 == 0:
                print(f"step {step + 1:4d}  loss {stats.loss:.3f}")
        after = await dev()
        print(f"dev loss after:  {after[0]:.3f}  ({name} {after[1]:.3f})")
    return before[0], after[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="ZO steps (default 200)")
    parser.add_argument("--lr", type=float, default=3e-4, help="learning rate (default 3e-4)")
    args = parser.parse_args()
    zoruntime.run(train(args.steps, args.lr))


if __name__ == "__main__":
    main()
