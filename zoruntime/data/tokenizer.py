"""A byte-level tokenizer for the built-in models: token = byte + 4, after OPT's four special ids
(0 <s>, 1 <pad>, 2 </s>, 3 <unk>), so a vocabulary of 260 covers any UTF-8 text.

Has the few methods the trainer uses from a HF tokenizer (``encode``, ``decode``,
``pad_token_id``, ``save_pretrained``) and is saved beside the model as
``zoruntime_tokenizer.json``. Knows nothing about models or tasks.
"""

from __future__ import annotations

import json
from pathlib import Path

FILE = "zoruntime_tokenizer.json"


class ByteTokenizer:
    offset = 4
    vocab_size = 256 + 4
    pad_token_id = 1
    bos_token_id = 2
    eos_token_id = 2

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [b + self.offset for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", errors="replace")

    def save_pretrained(self, folder: str | Path) -> None:
        Path(folder, FILE).write_text(json.dumps({"type": "byte", "offset": self.offset}))

    @staticmethod
    def saved_in(folder: str | Path) -> bool:
        return Path(folder, FILE).is_file()
