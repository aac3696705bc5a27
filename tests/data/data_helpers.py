"""Small corpora and stream reconstruction for the data tests."""

import json
import os
import random

import numpy as np

from mdn_scale.data.tokenizer import BYTE_EOD_ID

WORDS = ["delta", "momentum", "state", "chunk", "naïve", "größe", "数据", "λ", "token", "shard", "\t", "\n"]


def corpus(n_docs: int, seed: int = 0, tag: str = "doc", max_words: int = 60) -> list[str]:
    """n_docs distinct documents (a unique header, then random words, some non-ASCII)."""
    rng = random.Random(seed)
    return [f"<{tag}:{i:05d}> " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, max_words)))
            for i in range(n_docs)]


def write_jsonl(path, texts, field="text"):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({field: t, "other": 1}, ensure_ascii=False) + "\n")
    return str(path)


def write_text_folder(folder, texts):
    os.makedirs(folder, exist_ok=True)
    for i, t in enumerate(texts):
        with open(os.path.join(folder, f"f{i:04d}.txt"), "w", encoding="utf-8", newline="") as f:
            f.write(t)
    return str(folder)


def stream_of(batches) -> np.ndarray:
    """Rebuild the token stream a dp=1 loader cut its sequences from: sequence k is
    stream[k·T : k·T + T + 1] (consecutive sequences overlap by one token), so the rows' inputs
    laid end to end, plus the last label, are the stream."""
    rows_t, rows_l = [], []
    for b in batches:
        rows_t += list(b["tokens"].numpy())
        rows_l += list(b["labels"].numpy())
    for t, l in zip(rows_t[1:], rows_l[:-1]):
        assert t[0] == l[-1]  # overlap by one
    return np.concatenate(rows_t + [rows_l[-1][-1:]])


def split_docs(stream: np.ndarray, eod: int = BYTE_EOD_ID) -> list[np.ndarray]:
    """Complete documents (each ending in eod) of a stream; the partial first and last are dropped
    unless the stream starts at a document start (first=True is the caller's business)."""
    ends = np.flatnonzero(stream == eod)
    return [stream[a + 1:b + 1] for a, b in zip(ends[:-1], ends[1:])]


def decode_bytes(ids) -> str:
    ids = np.asarray(ids)
    return ids[ids != BYTE_EOD_ID].astype(np.uint8).tobytes().decode("utf-8")
