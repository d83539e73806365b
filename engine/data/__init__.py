"""Training data for the CLI: the corpus shipped with the package, documents from each
``--data`` format (:mod:`engine.data.sources`), packed into one token stream, and
reproducible random batches of ``seq_len`` windows from it.

Byte-level tokens need no tokenizer and nothing to download: token ``i`` is byte ``i``
of the UTF-8 text, so a vocabulary of 256 covers every input; documents are joined with a
blank line (``"\\n\\n"``, bytes 10 10). With a model's tokenizer they are joined with its EOS
token. The stream is held in memory as int32: 4 bytes per token (8 while it is built).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..errors import DataError
from .sources import Documents, open_documents

BYTE_VOCAB = 256
BYTE_SEPARATOR = (10, 10)  # "\n\n" between documents, as the .jsonl reader always joined them

__all__ = ["BYTE_VOCAB", "BYTE_SEPARATOR", "BYTES", "Documents", "Encoder", "TokenBatches", "byte_tokens",
           "corpus_documents", "default_corpus", "load_text", "open_documents", "token_stream"]


def default_corpus() -> str:
    """The English text shipped with the package (``engine/data/corpus.txt``)."""
    return resources.files(__package__).joinpath("corpus.txt").read_text(encoding="utf-8")


def corpus_documents() -> Documents:
    """The shipped corpus as one document (the default of ``train --data``)."""
    return Documents("engine/data/corpus.txt", "text", "", "the corpus shipped with the package", 1,
                     lambda: iter([[default_corpus()]]))


def load_text(path: str) -> str:
    """The text of a ``.txt`` file, or of a ``.jsonl`` file's ``"text"`` fields joined by blank
    lines. Raises DataError / OSError with the file and line named."""
    if not (path.endswith(".txt") or path.endswith(".jsonl")):
        raise DataError(f"dataset file {path!r}: expected a .txt or .jsonl file")
    text = "\n\n".join(doc for batch in open_documents(path).batches() for doc in batch)
    if not text.strip():
        raise DataError(f"dataset file {path!r} holds no text")
    return text


def byte_tokens(text: str) -> torch.Tensor:
    """The UTF-8 bytes of ``text`` as int64 token ids in [0, 256)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).to(torch.int64)


@dataclass(frozen=True)
class Encoder:
    """How texts become token ids: ``encode`` a batch of texts, ``separator`` between documents."""
    encode: Callable[[list[str]], Sequence[Sequence[int]]]
    separator: tuple[int, ...]
    name: str


def _byte_encode(texts: list[str]) -> list[np.ndarray]:
    return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in texts]


BYTES = Encoder(_byte_encode, BYTE_SEPARATOR, "byte-level")


def token_stream(docs: Documents, encoder: Encoder = BYTES, *, progress: bool = False) -> torch.Tensor:
    """All documents as one int32 token stream, the encoder's separator between text documents
    (pre-tokenized rows are joined as they are: their ids, BOS/EOS included, are the user's).
    Empty documents are skipped. Raises DataError when no document has a token."""
    separator = np.asarray(encoder.separator if docs.kind == "text" else (), dtype=np.int32)
    chunks: list[np.ndarray] = []
    count = 0
    with tqdm(total=docs.rows, desc="tokenizing", unit="doc", file=sys.stderr, disable=not progress,
              delay=1.0, dynamic_ncols=True) as bar:  # shown only when it takes a while
        for batch in docs.batches():
            ids = encoder.encode(batch) if docs.kind == "text" else batch  # type: ignore[arg-type]
            parts: list[np.ndarray] = []
            for one in ids:
                if len(one) == 0:
                    continue
                if count:
                    parts.append(separator)
                parts.append(np.asarray(one, dtype=np.int32))
                count += 1
            if parts:
                chunks.append(np.concatenate(parts))  # per batch: no per-document arrays kept
            bar.update(len(batch))
    if not count:
        raise DataError(f"--data {docs.path!r} ({docs.description}) holds no text: every document is empty")
    return torch.from_numpy(np.concatenate(chunks))


class TokenBatches:
    """Random windows of ``seq_len`` tokens from one packed token stream, ``batch`` per step
    (packing: a window may span a document boundary, the separator marks it).

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
        return torch.stack([stream[s:s + self.seq_len] for s in starts.tolist()]).to(torch.int64)

    def batch_at(self, step: int) -> torch.Tensor:
        """The ``[batch, seq_len]`` token ids of training step ``step``."""
        return self._windows(self.train, torch.Generator().manual_seed(self.seed * 1_000_003 + step))

    def eval_batch(self) -> torch.Tensor:
        """A fixed batch from the held-out part."""
        return self._windows(self.heldout, torch.Generator().manual_seed(self.seed - 1))
