"""Offline text for language models: next-byte prediction on Python's own standard library.

Every machine that runs flsplit has the standard library's source, so this corpus needs no
download: the top-level ``*.py`` files of ``sysconfig.get_paths()["stdlib"]``, sorted by
name, the first ``DOC_BYTES`` bytes of each. The tokenizer is the bytes themselves (a
vocabulary of 256). Every tenth file (the 1st, 11th, ...) is held out as the test split,
so the test measures text the model never saw, not just other windows of the same files.

A document is cut into non-overlapping windows of ``seq_len + 1`` bytes; a sample is a
window's first ``seq_len`` bytes (``x``) and the same window shifted by one (``y``: the
next byte at every position), both ``(seq_len,)`` int64. Each sample remembers its
document, which is how a non-iid split is drawn: a Dirichlet split *by document* gives
each node a few source files of its own (``flsplit.data.datasets.load_partition``).

The corpus is whatever the running Python ships: the same on every machine with the same
Python version, different across versions (each node's data is its own anyway; the
``corpus_digest`` tells runs on different Pythons apart).
"""

from __future__ import annotations

import hashlib
import sysconfig
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

__all__ = ["STDLIB_TEXT", "VOCAB_SIZE", "SEQ_LEN", "DOC_BYTES", "TEST_EVERY", "stdlib_documents", "windows",
           "stdlib_text", "corpus_digest"]

STDLIB_TEXT = "stdlib-text"
VOCAB_SIZE = 256  # bytes
SEQ_LEN = 64
DOC_BYTES = 8192  # of each file: ~1.2 MB of text on Python 3.11 (168 files)
TEST_EVERY = 10


@lru_cache(maxsize=1)
def stdlib_documents() -> tuple[tuple[str, bytes], ...]:
    """``(file name, first DOC_BYTES bytes)`` of each top-level standard-library module, by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no Python source files in the standard library directory {root}")
    return tuple((f.name, f.read_bytes()[:DOC_BYTES]) for f in files)


def windows(text: bytes, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping ``(seq_len + 1)``-byte windows of ``text`` as inputs and next-byte targets."""
    codes = np.frombuffer(text, dtype=np.uint8).astype(np.int64)
    n = (len(codes) - 1) // seq_len  # windows overlap their neighbours by the one target byte
    x = np.stack([codes[i * seq_len : (i + 1) * seq_len] for i in range(n)]) if n else np.zeros((0, seq_len), np.int64)
    y = np.stack([codes[i * seq_len + 1 : (i + 1) * seq_len + 1] for i in range(n)]) if n else x.copy()
    return x, y


@lru_cache(maxsize=4)
def stdlib_text(split: str, seq_len: int = SEQ_LEN) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The ``train`` or ``test`` split: inputs ``(N, seq_len)``, targets ``(N, seq_len)`` (int64)
    and each sample's document index, in one fixed shuffled order (read-only cache)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    xs, ys, docs = [], [], []
    for index, (_, text) in enumerate(stdlib_documents()):
        if (index % TEST_EVERY == 0) != (split == "test"):
            continue
        x, y = windows(text, seq_len)
        xs.append(x)
        ys.append(y)
        docs.append(np.full(len(x), index, dtype=np.int64))
    # One fixed shuffle: partitioners cut contiguous shards, and in file order an iid shard
    # would be a few whole files.
    order = np.random.default_rng(0).permutation(sum(len(d) for d in docs))
    x, y, doc = np.concatenate(xs)[order], np.concatenate(ys)[order], np.concatenate(docs)[order]
    return torch.from_numpy(x), torch.from_numpy(y), doc


def corpus_digest() -> str:
    """SHA-256 of the corpus (names and bytes): equal on two machines iff their data is."""
    h = hashlib.sha256()
    for name, text in stdlib_documents():
        h.update(name.encode() + b"\0" + len(text).to_bytes(8, "little") + text)
    return h.hexdigest()
