"""Missing data: an error naming the key, except the demo's shards, which are built on first use
from the Python standard library's sources (the data package's make_shards default)."""

from __future__ import annotations

import os
import re

import torch.distributed as dist

from .config import ConfigError, RunConfig

_REMOTE = re.compile(r"^(pipe:|[a-z][a-z0-9+.-]*://)")
DEMO_DIR = os.path.join("data", "stdlib")


def _local_paths(cfg: RunConfig):
    for field in ("datasets", "valid_datasets"):
        for i, spec in enumerate(getattr(cfg.data, field, []) or []):
            path = getattr(spec, "path", spec)
            if not isinstance(path, str) or _REMOTE.match(path) or any(c in path for c in "*?[{"):
                continue  # URLs, pipe: commands and patterns are checked when opened
            yield f"data.{field}[{i}].path", path


def _is_demo(path: str) -> bool:
    return os.path.normpath(path) == os.path.normpath(DEMO_DIR)


def check_data(cfg: RunConfig) -> None:
    for key, path in _local_paths(cfg):
        if not os.path.exists(path) and not _is_demo(path):
            raise ConfigError(f"{key}: {path!r} does not exist")


def ensure_demo_shards(cfg: RunConfig, layout) -> None:
    """Rank 0 builds the demo shards if a configured dataset is the demo folder and lacks a
    manifest; the other ranks wait."""
    missing = [p for _, p in _local_paths(cfg)
               if _is_demo(p) and not os.path.exists(os.path.join(p, "manifest.json"))]
    if missing and layout.rank == 0:
        from mdn_scale.data.make_shards import make_shards

        print(f"building the demo shards in {missing[0]} from the Python standard library ...",
              flush=True)
        make_shards(None, missing[0])
    if missing and dist.is_initialized():
        dist.barrier()
