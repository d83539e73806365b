"""Training text for the CLI: the corpus shipped with the package, ``.txt`` / ``.jsonl``
files, byte-level tokens, and reproducible random batches.

Byte-level tokens need no tokenizer and nothing to download: token ``i`` is byte ``i``
of the UTF-8 text, so a vocabulary of 256 covers every input.
"""
from __future__ import annotations

import json
import os
from importlib import resources
from typing import Callable, Optional

import torch

BYTE_VOCAB = 256


def default_corpus() -> str:
    """The English text shipped with the package (``engine/data/corpus.txt``)."""
    return resources.files(__package__).joinpath("corpus.txt").read_text(encoding="utf-8")


def load_text(path: str) -> str:
    """Reads a ``.txt`` file, or a ``.jsonl`` file whose lines are objects with a ``"text"`` field
    (documents joined by blank lines). Raises ValueError / OSError with the file and line named."""
    if not os.path.isfile(path):
        raise FileNotFoundError(2, f"dataset file {path!r} does not exist", path)
    if path.endswith(".jsonl"):
        docs = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{number}: expected an object with a string \"text\" field")
                docs.append(record["text"])
        text = "\n\n".join(docs)
    elif path.endswith(".txt"):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    else:
        raise ValueError(f"dataset file {path!r}: expected a .txt or .jsonl file")
    if not text.strip():
        raise ValueError(f"dataset file {path!r} holds no text")
    return text


def byte_tokens(text: str) -> torch.Tensor:
    """The UTF-8 bytes of ``text`` as int64 token ids in [0, 256)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(torch.int64)


def tokenize(text: str, tokenizer: Optional[Callable[[str], list[int]]] = None) -> torch.Tensor:
    """Token ids of ``text``: ``tokenizer(text)`` when given, else byte-level."""
    if tokenizer is None:
        return byte_tokens(text)
    return torch.tensor(tokenizer(text), dtype=torch.int64)


class TokenBatches:
    """Random windows of ``seq_len`` tokens from one token stream, ``batch`` per step.

    Batch ``i`` depends only on ``seed`` and ``i``, so a resumed run sees the same data
    as an uninterrupted one. The last ``holdout`` fraction of the stream is kept apart
    for :meth:`eval_batch`.
    """

    def __init__(self, tokens: torch.Tensor, batch: int, seq_len: int, seed: int = 0, holdout: float = 0.1):
        if batch < 1 or seq_len < 2:
            raise ValueError(f"batch must be >= 1 and seq_len >= 2 (got batch={batch}, seq_len={seq_len})")
        split = int(len(tokens) * (1 - holdout))
        self.train, self.heldout = tokens[:split], tokens[split:]
        if len(self.train) <= seq_len:
            raise ValueError(f"the dataset has {len(tokens)} tokens: too few for --seq-len {seq_len} "
                             f"(need more than {int(seq_len / (1 - holdout)) + 1})")
        self.batch, self.seq_len, self.seed = batch, seq_len, seed

    def _windows(self, stream: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if len(stream) <= self.seq_len:
            stream = self.train  # a tiny hold-out falls back to training windows
        starts = torch.randint(0, len(stream) - self.seq_len, (self.batch,), generator=generator)
        return torch.stack([stream[s:s + self.seq_len] for s in starts.tolist()])

    def batch_at(self, step: int) -> torch.Tensor:
        """The ``[batch, seq_len]`` token ids of training step ``step``."""
        return self._windows(self.train, torch.Generator().manual_seed(self.seed * 1_000_003 + step))

    def eval_batch(self) -> torch.Tensor:
        """A fixed batch from the held-out part."""
        return self._windows(self.heldout, torch.Generator().manual_seed(self.seed - 1))
