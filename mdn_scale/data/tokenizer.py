"""Tokenizers for shard making: a byte-level default and HF `tokenizers` JSON files.

Both encode one document (a str) to a 1-D numpy array of token ids and decode ids back to text.
`identity()` is what the manifest records, so a loader can refuse to mix shards made with
different tokenizers and a trainer can check the model's vocabulary against `vocab_size`.

Byte-level default (needs nothing): ids 0..255 are the UTF-8 bytes of the text, id 256
(`BYTE_EOD_ID`) ends a document, `vocab_size` = 257 (`BYTE_VOCAB_SIZE`). Decoding is exact.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

BYTE_EOD_ID = 256
BYTE_VOCAB_SIZE = 257
# The byte tokenizer has no file; its identity hash is the hash of this fixed name.
_BYTE_TOKENIZER_NAME = "mdn_scale.bytes.v1"

# End-of-document tokens tried, in order, when an HF tokenizer is given without `eod_token`.
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[EOS]")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end of document 256."""

    kind = "bytes"
    vocab_size = BYTE_VOCAB_SIZE
    eod_id = BYTE_EOD_ID

    def encode(self, text: str) -> np.ndarray:
        """text -> int64 ids [n] (no end-of-document id)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        """ids [n] -> text; end-of-document ids are dropped."""
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[ids != BYTE_EOD_ID]
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ValueError(f"byte tokenizer: ids outside 0..256 in {ids[(ids < 0) | (ids > 255)][:5]}")
        return ids.astype(np.uint8).tobytes().decode("utf-8")

    def identity(self) -> dict:
        return {
            "kind": self.kind,
            "name": _BYTE_TOKENIZER_NAME,
            "sha256": hashlib.sha256(_BYTE_TOKENIZER_NAME.encode()).hexdigest(),
            "vocab_size": self.vocab_size,
            "eod_id": self.eod_id,
        }


class HFTokenizer:
    """A HuggingFace `tokenizers` JSON file (e.g. GPT-2's tokenizer.json).

    Documents are encoded without the tokenizer's own special tokens (`add_special_tokens=False`);
    the shard maker appends `eod_id` itself. `eod_token` names the end-of-document token; by
    default the first of `EOD_CANDIDATES` the vocabulary has.
    """

    kind = "hf"

    def __init__(self, path: str, eod_token: str | None = None):
        from tokenizers import Tokenizer

        if not os.path.isfile(path):
            raise ValueError(f"tokenizer file {path!r} does not exist")
        with open(path, "rb") as f:
            self.file_bytes = f.read()
        try:
            self.tok = Tokenizer.from_str(self.file_bytes.decode("utf-8"))
        except Exception as exn:  # tokenizers raises a plain Exception on bad JSON
            raise ValueError(f"tokenizer file {path!r} is not a HF tokenizers JSON file: {exn}") from exn
        self.path = path
        candidates = (eod_token,) if eod_token is not None else EOD_CANDIDATES
        found = [(t, self.tok.token_to_id(t)) for t in candidates if self.tok.token_to_id(t) is not None]
        if not found:
            raise ValueError(
                f"tokenizer {path!r} has no end-of-document token "
                + (f"{eod_token!r}" if eod_token is not None else f"(tried {', '.join(EOD_CANDIDATES)})")
                + ": name one with eod_token / --eod-token"
            )
        self.eod_token, self.eod_id = found[0]
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encs = self.tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1) if int(i) != self.eod_id]
        return self.tok.decode(ids, skip_special_tokens=False)

    def identity(self) -> dict:
        return {
            "kind": self.kind,
            "name": os.path.basename(self.path),
            "sha256": hashlib.sha256(self.file_bytes).hexdigest(),
            "vocab_size": self.vocab_size,
            "eod_id": self.eod_id,
            "eod_token": self.eod_token,
        }


def load_tokenizer(path: str | None = None, eod_token: str | None = None):
    """None -> the byte tokenizer; a path -> that HF tokenizers JSON file."""
    if path is None or path == "bytes":
        if eod_token is not None:
            raise ValueError("eod_token applies to HF tokenizer files only (the byte tokenizer's is id 256)")
        return ByteTokenizer()
    return HFTokenizer(path, eod_token)


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that stores ids below vocab_size (uint16 or uint32)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")
