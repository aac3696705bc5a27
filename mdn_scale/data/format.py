"""The shard format: webdataset tar files of tokenized documents, and their manifest.

One tar member per document: `<key>.tokens.u16` (or `.tokens.u32` where the vocabulary needs it),
the document's token ids as raw little-endian unsigned integers, ending with the tokenizer's
end-of-document id. Raw integers, not `.npy`/pickle: reading a shard never runs code from it.
Keys are the document's index in the build, zero-padded (`0000000042`).

The manifest (`manifest.json`, written last, so its presence means the build completed):

    {"format": "mdn_scale.tokens", "format_version": 1,
     "tokenizer": {"kind", "name", "sha256", "vocab_size", "eod_id", ...},
     "token_field": "tokens.u16", "documents": N, "tokens": M,
     "shards": [{"name": "shard-000000.tar", "documents": n, "tokens": m, "bytes": b, "sha256": h}, ...],
     "build": {"inputs": [...], "fingerprint": ..., "options": {...}, "skipped": {...}}}

Token counts include the end-of-document ids. Shard names are paths relative to the manifest's
folder; a manifest naming anything else (an absolute path, a URL, a `pipe:` command) is refused:
shell commands come only from the user's own config (DESIGN.md §7).
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

FORMAT = "mdn_scale.tokens"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKEN_FIELDS = {"tokens.u16": np.dtype("<u2"), "tokens.u32": np.dtype("<u4")}


class ShardError(ValueError):
    """A shard that cannot be read or does not match its manifest. `.shard` names it."""

    def __init__(self, shard: str, message: str):
        super().__init__(f"shard {shard}: {message}")
        self.shard = shard


def token_field_for(dtype: np.dtype) -> str:
    return "tokens.u16" if np.dtype(dtype).itemsize == 2 else "tokens.u32"


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def check_relative_shard_name(name, manifest_path: str) -> str:
    """A manifest's shard entry must be a plain relative path inside the manifest's folder."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"manifest {manifest_path}: shard name {name!r} is not a non-empty string")
    parts = name.replace("\\", "/").split("/")
    if _SCHEME.match(name) or os.path.isabs(name) or ".." in parts:
        raise ValueError(
            f"manifest {manifest_path}: shard {name!r} is not a relative path inside the manifest's "
            "folder; manifests may not name URLs or pipe: commands (put those in your own config, "
            "e.g. a dataset's url_template)"
        )
    return name


def read_manifest(path: str) -> dict:
    """Load and check a manifest file; errors name the file and the bad field."""
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"manifest {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise ValueError(f"manifest {path} is not valid JSON: {exn}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"manifest {path}: 'format' is not {FORMAT!r}")
    if m.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"manifest {path}: format_version {m.get('format_version')!r} is not supported "
            f"(this reader knows {FORMAT_VERSION})"
        )
    if m.get("token_field") not in TOKEN_FIELDS:
        raise ValueError(f"manifest {path}: token_field {m.get('token_field')!r} is not one of {sorted(TOKEN_FIELDS)}")
    tok = m.get("tokenizer")
    if not isinstance(tok, dict) or not all(k in tok for k in ("kind", "sha256", "vocab_size", "eod_id")):
        raise ValueError(f"manifest {path}: 'tokenizer' needs kind, sha256, vocab_size and eod_id")
    shards = m.get("shards")
    if not isinstance(shards, list) or not shards:
        raise ValueError(f"manifest {path}: 'shards' is not a non-empty list")
    for i, s in enumerate(shards):
        if not isinstance(s, dict):
            raise ValueError(f"manifest {path}: shards[{i}] is not an object")
        check_relative_shard_name(s.get("name"), path)
        for k in ("documents", "tokens"):
            if not isinstance(s.get(k), int) or s[k] < 0:
                raise ValueError(f"manifest {path}: shards[{i}].{k} is not a non-negative integer")
    return m


def write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_shard(url: str, expected_documents: int | None = None, expected_tokens: int | None = None):
    """Read one whole shard: list of (key, ids [n] uint16/uint32 numpy array), in tar order.

    Any failure (missing file, unreadable or truncated tar, a member that is not a token array,
    counts that differ from the manifest's) raises ShardError naming the shard.
    """
    import webdataset as wds

    docs = []
    stream = None
    try:
        stream = wds.gopen(url, "rb")
        files = wds.tariterators.tar_file_expander([{"url": url, "stream": stream}])
        for sample in wds.tariterators.group_by_keys(files):
            docs.append(_decode_document(url, sample))
        s, stream = stream, None
        s.close()  # a pipe: command that exited non-zero reports here
    except ShardError:
        raise
    except Exception as exn:  # tarfile, OSError, gopen's pipe errors: name the shard, keep the cause
        raise ShardError(url, f"cannot be read ({type(exn).__name__}: {exn.args[0] if exn.args else exn})") from exn
    finally:
        if stream is not None:  # failed mid-read: release the file or process, the error is raised above
            try:
                stream.close()
            except Exception:
                pass
    if expected_documents is not None and len(docs) != expected_documents:
        raise ShardError(url, f"holds {len(docs)} documents, the manifest says {expected_documents} (truncated or replaced?)")
    if expected_tokens is not None:
        n = sum(len(d) for _, d in docs)
        if n != expected_tokens:
            raise ShardError(url, f"holds {n} tokens, the manifest says {expected_tokens} (truncated or replaced?)")
    return docs


def _decode_document(url: str, sample: dict):
    fields = [k for k in sample if k in TOKEN_FIELDS]
    if len(fields) != 1:
        other = sorted(k for k in sample if not k.startswith("__"))
        raise ShardError(url, f"document {sample['__key__']!r} has fields {other}, expected one of {sorted(TOKEN_FIELDS)}")
    data = sample[fields[0]]
    dtype = TOKEN_FIELDS[fields[0]]
    if len(data) % dtype.itemsize:
        raise ShardError(url, f"document {sample['__key__']!r}: {len(data)} bytes is not a whole number of {fields[0]} tokens")
    return sample["__key__"], np.frombuffer(data, dtype=dtype)
