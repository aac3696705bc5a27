"""Resolve a DatasetSpec to its list of shards (and tokenizer, when there is a manifest)."""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from dataclasses import dataclass

import braceexpand

from .config import DatasetSpec
from .format import MANIFEST_NAME, ShardError, read_manifest

log = logging.getLogger("mdn_scale.data")


@dataclass
class ShardRef:
    url: str  # what webdataset opens
    name: str  # basename: the held-out split hashes it, so moving the data keeps the split
    documents: int | None = None  # from the manifest; None without one
    tokens: int | None = None


@dataclass
class ResolvedDataset:
    label: str
    shards: list[ShardRef]
    tokenizer: dict | None
    weight: float


def _is_url(path: str) -> bool:
    return path.startswith("pipe:") or "://" in path


def resolve_dataset(spec: DatasetSpec, skip_bad_shards: bool = False) -> ResolvedDataset:
    """Manifest, folder, glob, braces or URLs -> shards. Missing local files: ShardError naming
    them (or a warning and dropped with skip_bad_shards); a pattern matching nothing: ValueError."""
    path = spec.path
    manifest_path = None
    if not _is_url(path):
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST_NAME)):
            manifest_path = os.path.join(path, MANIFEST_NAME)
        elif path.endswith(".json"):
            manifest_path = path
    if spec.url_template is not None and manifest_path is None:
        raise ValueError(f"dataset {path!r}: url_template needs a manifest (a manifest file or a folder with {MANIFEST_NAME})")

    if manifest_path is not None:
        m = read_manifest(manifest_path)
        base = os.path.dirname(manifest_path)
        shards = []
        for s in m["shards"]:
            url = spec.url_template.replace("{shard}", s["name"]) if spec.url_template else os.path.join(base, s["name"])
            shards.append(ShardRef(url, os.path.basename(s["name"]), s["documents"], s["tokens"]))
        tokenizer = m["tokenizer"]
    else:
        urls = []
        if os.path.isdir(path):
            urls = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
            if not urls:
                raise ValueError(f"dataset {path!r}: folder holds neither {MANIFEST_NAME} nor *.tar shards")
        else:
            patterns = list(braceexpand.braceexpand(path))
            if len(patterns) == 1 and not _is_url(path) and not glob.has_magic(path) and not os.path.exists(path):
                raise ValueError(
                    f"dataset {path!r} does not exist (expected a manifest, a folder with {MANIFEST_NAME} "
                    "or *.tar shards, or a shard glob/URL; tools/make_shards.py makes shards, and with no "
                    "arguments the demo data in data/stdlib)"
                )
            for pattern in patterns:
                if _is_url(pattern) or not glob.has_magic(pattern):
                    urls.append(pattern)
                else:
                    found = sorted(glob.glob(pattern))
                    if not found:
                        raise ValueError(f"dataset {path!r}: no file matches {pattern!r}")
                    urls += found
        shards = [ShardRef(u, _shard_name(u)) for u in urls]
        tokenizer = None

    missing = [s.url for s in shards if not _is_url(s.url) and not os.path.isfile(s.url)]
    if missing and not skip_bad_shards:
        raise ShardError(missing[0], f"does not exist (dataset {path!r}; {len(missing)} of {len(shards)} shards missing)")
    if len(missing) == len(shards):
        raise ValueError(f"dataset {path!r}: none of its {len(shards)} shards exists")
    for url in missing:  # kept in the list, so shard indices (and saved loader positions) stay stable
        log.warning("shard %s does not exist (dataset %r): it will be skipped (skip_bad_shards is on)", url, path)
    return ResolvedDataset(label=path, shards=shards, tokenizer=tokenizer, weight=float(spec.weight))


def _shard_name(url: str) -> str:
    """Basename of a shard path or URL; for a pipe: command, of its last argument that is not '-'."""
    if url.startswith("pipe:"):
        args = [a for a in url[5:].split() if a != "-"]
        url = args[-1] if args else url
    return os.path.basename(url.rstrip("/"))


def check_same_tokenizer(datasets: list[ResolvedDataset]) -> dict | None:
    """All datasets with a manifest must share one tokenizer; returns it (None if none has one)."""
    known = [(d.label, d.tokenizer) for d in datasets if d.tokenizer is not None]
    if len({t["sha256"] for _, t in known}) > 1:
        listing = "; ".join(f"{label}: {t.get('name', t['kind'])} ({t['sha256'][:12]})" for label, t in known)
        raise ValueError(f"datasets were made with different tokenizers: {listing}")
    return known[0][1] if known else None


def _unit_hash(text: str) -> float:
    """A stable number in [0, 1) for a string."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") / 2.0**64


def document_held_out(shard_name: str, key: str, fraction: float) -> bool:
    return fraction > 0 and _unit_hash(f"{shard_name}/{key}") < fraction


def held_out_shards(ds: ResolvedDataset, fraction: float) -> set[int]:
    """Indices of the shards held out: the round(fraction·n) (at least 1) with the smallest hash."""
    if fraction <= 0:
        return set()
    n = len(ds.shards)
    k = max(1, round(fraction * n))
    if k >= n:
        raise ValueError(
            f"dataset {ds.label!r}: holdout='shards' with validation_fraction {fraction} takes {k} of its "
            f"{n} shard(s), leaving none to train on: use holdout='documents' or more shards"
        )
    order = sorted(range(n), key=lambda i: (_unit_hash(ds.shards[i].name), i))
    return set(order[:k])
