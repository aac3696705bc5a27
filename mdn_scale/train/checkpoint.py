"""Sharded, atomic, layout-independent checkpoints.

Why torch.distributed.checkpoint (DCP) and not Megatron's ``dist_checkpointing``: Megatron's
torch_dist strategy is CUDA-bound in megatron-core 0.16.1 (``torch.cuda.synchronize`` while
preloading, result tensors placed on "cuda", DESIGN.md §9), so it cannot serve the CPU demo and
CI. DCP runs on gloo and NCCL alike, writes one file per rank in parallel, deduplicates replicas
and reshards on read: a reader asks for the global region its local tensor covers and DCP reads
it from whichever saved chunks overlap it. What DCP cannot know is how Megatron splits a
parameter; Megatron's own ``sharded_state_dict()`` says exactly that (global shape, this rank's
offset, layer axes prepended under PP, SwiGLU halves split by factories). So each local tensor is
handed to DCP as a :class:`ShardRef` — "this local tensor is the chunk at offset O of a global
tensor of shape G" — and the checkpoint reloads under any TP/PP/CP/DP layout.

Directory layout (``checkpoint.dir``)::

    step_00000100/            one complete checkpoint
        .metadata, __*.distcp  DCP: model parameters and optimizer moments (tensors only)
        extra/rank_00003.pt    per-rank RNG states and data-loader position (tensors/ints only,
                               read with ``torch.load(weights_only=True)``)
        meta.json              step, consumed tokens, scheduler, layout, file sizes (written last)
    latest                     name of the newest complete checkpoint (written after the rename)

A save goes to ``step_XXXXXXXX.tmp`` and is renamed once every rank has finished and rank 0 has
written meta.json, so a crash mid-save leaves no directory that looks complete. On load, the
newest checkpoint is checked against its meta.json (every file present, sizes equal); a partial
or corrupt one is reported and the previous complete one is used.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import re
import shutil
import time
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from .optimizer import step_tensor

STEP_DIR = re.compile(r"^step_(\d{8})$")
META = "meta.json"
LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt, or does not fit the model it is loaded into."""


# ---------------------------------------------------------------- DCP adapter

class ShardRef:
    """This rank's chunks of one global tensor of ``global_shape``: (local tensor, offsets) pairs.

    Implements the checkpointable protocol DCP's default planners look for (the hooks DTensor
    implements), so any split Megatron describes — uneven, several chunks per rank (SwiGLU's two
    halves of one key), layer axes prepended under PP — can be saved and resharded.
    """

    def __init__(self, global_shape: Iterable[int]):
        self.global_shape = torch.Size(global_shape)
        self.chunks: list[tuple[torch.Tensor, torch.Size]] = []

    @classmethod
    def whole(cls, tensor: torch.Tensor) -> "ShardRef":
        return cls(tensor.shape).add(tensor, [0] * tensor.dim())

    def add(self, local: torch.Tensor, offsets: Iterable[int]) -> "ShardRef":
        offsets = torch.Size(offsets)
        if len(offsets) != len(self.global_shape) or local.dim() != len(self.global_shape):
            raise ValueError(f"shard of rank {local.dim()} does not match global shape "
                             f"{tuple(self.global_shape)} / offsets {tuple(offsets)}")
        self.chunks.append((local, offsets))
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.chunks[0][0].dtype

    def size(self) -> torch.Size:  # DCP compares this with the saved global size
        return self.global_shape

    def local_at(self, offsets) -> torch.Tensor:
        for local, off in self.chunks:
            if off == torch.Size(offsets):
                return local
        raise KeyError(f"no local chunk at offset {tuple(offsets)}")

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [WriteItem(
            index=MetadataIndex(fqn, off),
            type=WriteItemType.SHARD,
            tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=off, sizes=local.size()),
                                        properties=TensorProperties.create_from_tensor(local),
                                        size=self.global_shape))
            for local, off in self.chunks]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=off, sizes=local.size()) for local, off in self.chunks]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self.local_at(index.offset)


class _SavePlanner(DefaultSavePlanner):
    def lookup_object(self, index: MetadataIndex) -> Any:
        obj = self.state_dict[index.fqn]
        if isinstance(obj, ShardRef):
            return obj.local_at(index.offset).detach()
        return super().lookup_object(index)


class _LoadPlanner(DefaultLoadPlanner):
    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        # DCP's meta-tensor initialisation replaces objects it does not know with None (torch
        # 2.13): keep our ShardRefs (already materialised) and put them back afterwards.
        refs = {k: v for k, v in state_dict.items() if isinstance(v, ShardRef)}
        super().set_up_planner(state_dict, metadata, is_coordinator)
        for d in (state_dict, self.state_dict, self.original_state_dict):
            d.update(refs)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        obj = self.state_dict[index.fqn]
        if isinstance(obj, ShardRef):
            return obj.local_at(index.offset).detach()
        return super().lookup_tensor(index)


def _shard_refs_from_megatron(sharded: dict, prefix: str = "") -> dict[str, ShardRef]:
    """Flatten a Megatron ``sharded_state_dict()`` into DCP keys → ShardRef."""
    from megatron.core.dist_checkpointing.mapping import (
        LocalNonpersistentObject,
        ShardedObject,
        ShardedTensor,
        ShardedTensorFactory,
    )

    out: dict[str, ShardRef] = {}

    def visit(obj: Any) -> None:
        if isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)
        elif isinstance(obj, ShardedTensorFactory):
            visit(obj.build())
        elif isinstance(obj, ShardedTensor):
            if obj.flattened_range is not None:
                raise CheckpointError(f"{obj.key}: flattened (distributed-optimizer) shards are "
                                      "not supported by this checkpoint format")
            # a view (never a copy): loading writes through into the parameter
            local = obj.data.view((1,) * obj.prepend_axis_num + tuple(obj.data.shape))
            ref = out.setdefault(prefix + obj.key, ShardRef(obj.global_shape))
            if ref.global_shape != torch.Size(obj.global_shape):
                raise CheckpointError(f"{obj.key}: chunks disagree on the global shape")
            ref.add(local, obj.global_offset)
        elif isinstance(obj, (ShardedObject, LocalNonpersistentObject)) or obj is None:
            pass  # extra states (e.g. TE fp8 metadata): not part of our models' weights
        else:
            raise CheckpointError(f"unexpected entry {type(obj).__name__} in sharded_state_dict")

    visit(sharded)
    return out


def _sharded_view(module: torch.nn.Module, tensor_of=lambda p: p) -> dict[str, ShardRef]:
    """Every parameter of ``module`` as ShardRefs; ``tensor_of(param)`` substitutes the tensor
    to store (a param itself, or an optimizer moment with the same sharding)."""
    inner = module
    while hasattr(inner, "module"):
        inner = inner.module
    if hasattr(inner, "sharded_state_dict"):
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

        sharded = inner.sharded_state_dict()
        by_ptr = {p.data_ptr(): p for p in inner.parameters()}
        covered = set()

        def substitute(obj):
            if isinstance(obj, dict):
                return {k: substitute(v) for k, v in obj.items()}
            if isinstance(obj, (ShardedTensor, ShardedTensorFactory)) and obj.data is not None:
                p = by_ptr.get(obj.data.data_ptr())
                if p is None or p.shape != obj.data.shape:
                    return None  # a buffer, not a parameter: no optimizer state
                t = tensor_of(p)
                if t is None:
                    return None
                covered.add(id(p))
                if isinstance(obj, ShardedTensor):
                    return dataclasses.replace(obj, data=t, dtype=t.dtype)
                return dataclasses.replace(obj, data=t)
            return obj

        if tensor_of is not _identity:
            sharded = substitute(sharded)
            # every parameter with a tensor to store must have been found in the sharded view,
            # or its optimizer state would silently be left out of the checkpoint
            missing = [n for n, p in inner.named_parameters()
                       if id(p) not in covered and tensor_of(p) is not None]
            if missing:
                raise CheckpointError("optimizer state of parameters not described by the "
                                      f"model's sharded_state_dict(): {missing}")
        return _shard_refs_from_megatron(sharded)
    # A plain torch module: every parameter whole and replicated.
    out = {}
    for name, p in inner.named_parameters():
        t = tensor_of(p)
        if t is not None:
            out[name] = ShardRef.whole(t)
    return out


def _identity(p):
    return p


def model_state(model: torch.nn.Module) -> dict[str, ShardRef]:
    return {f"model/{k}": v for k, v in _sharded_view(model, _identity).items()}


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, ShardRef]:
    """Adam moments with their parameter's sharding. Materialises empty state first (torch
    creates it lazily on the first step) so a fresh optimizer can be loaded into. Under ZeRO
    (parallel.distributed_optimizer) a rank holds, saves and loads only its parameters' moments;
    DCP assembles the whole from all ranks, so it reloads with or without ZeRO, any layout."""
    optimizer = getattr(optimizer, "optim", optimizer)
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state[p]
            if "exp_avg" not in st:
                st["step"] = step_tensor(group, p)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    out = {}
    for name in ("exp_avg", "exp_avg_sq"):
        view = _sharded_view(model, lambda p, n=name: optimizer.state[p][n] if p in optimizer.state else None)
        out.update({f"optim/{name}/{k}": v for k, v in view.items()})
    return out


def _optimizer_step_count(optimizer) -> float:
    optimizer = getattr(optimizer, "optim", optimizer)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if "step" in optimizer.state.get(p, {}):
                return float(optimizer.state[p]["step"])
    return 0.0


def _set_optimizer_step_count(optimizer, value: float) -> None:
    optimizer = getattr(optimizer, "optim", optimizer)
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p]["step"] = step_tensor(group, p, value)


# ---------------------------------------------------------------- safe metadata reading

_SAFE_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                 "torch.distributed.checkpoint.planner", "torch.distributed.checkpoint.storage")
_SAFE_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                 ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
                 ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP stores its index (``.metadata``) as a pickle. Unpickling it whole would run whatever
    a crafted file names; this one builds only DCP's own metadata classes and torch sizes,
    dtypes and layouts, and refuses anything else by name (DESIGN.md §7)."""

    def find_class(self, module: str, name: str):
        if module in _SAFE_MODULES or (module, name) in _SAFE_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointError(f"checkpoint metadata refers to {module}.{name}, which a DCP "
                              "index never holds: refusing to load it")


class _SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        with self.fs.create_stream(self._get_metadata_path(rank), "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ---------------------------------------------------------------- RNG

def rng_state() -> dict:
    """Every generator a step may draw from, as tensors and plain Python values only (so it
    reloads under ``torch.load(weights_only=True)``)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        state["megatron"] = dict(get_cuda_rng_tracker().get_states())
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("megatron"):
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(state["megatron"])


# ---------------------------------------------------------------- save / load

def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _broadcast_obj(obj):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save(directory: str, *, step: int, model, optimizer, scheduler, extra: dict,
         meta: dict, keep_last: int = 0) -> str:
    """Collective: every rank calls it. ``extra`` is this rank's small state (RNG, data loader
    position); ``meta`` the run-level state rank 0 records (consumed tokens, layout...)."""

    def write(tmp):
        state = {**model_state(model), **optimizer_state(model, optimizer)}
        dcp.save(state, checkpoint_id=tmp, planner=_SavePlanner())
        return {"scheduler": scheduler.state_dict() if scheduler else None,
                "optimizer_step": _optimizer_step_count(optimizer)}

    return save_step(directory, step, write, extra=extra, meta=meta, keep_last=keep_last)


def save_step(directory: str, step: int, write, *, extra: dict, meta: dict, keep_last: int = 0) -> str:
    """Collective: the atomic frame of every checkpoint (either backend's). Every rank calls
    ``write(tmp)`` into ``step_XXXXXXXX.tmp`` and saves its ``extra``; once all have finished,
    rank 0 writes meta.json (``meta``, what ``write`` returned, the file sizes), renames the
    folder, points ``latest`` at it and prunes to ``keep_last``."""
    rank = _rank()
    final = os.path.join(directory, step_dir_name(step))
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(directory, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a save that died earlier
        os.makedirs(os.path.join(tmp, "extra"))
    _barrier()

    written = write(tmp)
    torch.save(extra, os.path.join(tmp, "extra", f"rank_{rank:05d}.pt"))
    _barrier()

    if rank == 0:
        files = {}
        for root, _, names in os.walk(tmp):
            for n in names:
                full = os.path.join(root, n)
                files[os.path.relpath(full, tmp)] = os.path.getsize(full)
        record = dict(meta, step=step, **written, files=files,
                      world_size=dist.get_world_size() if dist.is_initialized() else 1,
                      saved_at=time.time())
        _write_atomic(os.path.join(tmp, META), json.dumps(record, indent=1))
        if os.path.exists(final):  # re-saving the same step (e.g. a signal right after a save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(os.path.join(directory, LATEST), step_dir_name(step) + "\n")
        _prune(directory, keep_last)
    _barrier()
    return final


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _prune(directory: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    steps = list_checkpoints(directory)
    for s in steps[:-keep_last]:
        shutil.rmtree(os.path.join(directory, step_dir_name(s)), ignore_errors=True)


def list_checkpoints(directory: str) -> list[int]:
    if not directory or not os.path.isdir(directory):
        return []
    return sorted(int(m.group(1)) for n in os.listdir(directory) if (m := STEP_DIR.match(n)))


def verify(path: str) -> dict:
    """Return the checkpoint's meta record, or raise CheckpointError saying what is wrong."""
    meta_path = os.path.join(path, META)
    if not os.path.isfile(meta_path):
        raise CheckpointError(f"{path}: no {META} (the save did not finish)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}/{META}: unreadable ({e})") from e
    for rel, size in meta.get("files", {}).items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise CheckpointError(f"{path}: file {rel} is missing")
        if os.path.getsize(full) != size:
            raise CheckpointError(f"{path}: file {rel} has {os.path.getsize(full)} bytes, "
                                  f"expected {size}")
    return meta


def find_loadable(directory: str, log=print) -> tuple[str, dict] | None:
    """Newest complete checkpoint under ``directory`` (rank 0 decides, all ranks agree)."""
    choice = None
    if _rank() == 0:
        for step in reversed(list_checkpoints(directory)):
            path = os.path.join(directory, step_dir_name(step))
            try:
                choice = (path, verify(path))
                break
            except CheckpointError as e:
                log(f"[checkpoint] WARNING: skipping {e}; trying the previous checkpoint")
    return _broadcast_obj(choice)


def check_shapes(state: dict[str, ShardRef], path: str) -> None:
    """Name every tensor whose saved global shape differs from the model's, or that is missing."""
    md = _SafeReader(path).read_metadata().state_dict_metadata
    problems = []
    for key, ref in state.items():
        saved = md.get(key)
        if saved is None:
            problems.append(f"{key}: not in the checkpoint")
        elif not isinstance(saved, TensorStorageMetadata):
            problems.append(f"{key}: saved as a non-tensor object")
        elif tuple(saved.size) != tuple(ref.global_shape):
            problems.append(f"{key}: checkpoint has shape {tuple(saved.size)}, the model "
                            f"{tuple(ref.global_shape)}")
        elif saved.properties.dtype != ref.dtype:
            problems.append(f"{key}: checkpoint has dtype {saved.properties.dtype}, the model "
                            f"{ref.dtype}")
    if problems:
        raise CheckpointError(f"{path} does not fit the model:\n  " + "\n  ".join(problems))


def load(path: str, meta: dict, *, model, optimizer=None, scheduler=None) -> dict | None:
    """Load model (and optimizer, scheduler) in place; return this rank's ``extra`` dict, or
    None when the checkpoint was written by a different world size (RNG and loader position are
    per rank; the caller falls back to the run-level state in ``meta``)."""
    if meta.get("format") == "deepspeed":  # ZeRO partitions, no DCP index (deepspeed_backend.py)
        raise CheckpointError(f"{path} is a checkpoint of train.backend=deepspeed: resume it with that "
                              "backend, or convert it with tools/convert_deepspeed_checkpoint.py to-ours")
    state = dict(model_state(model))
    if optimizer is not None:
        state.update(optimizer_state(model, optimizer))
    check_shapes(state, path)
    dcp.load(state, storage_reader=_SafeReader(path), planner=_LoadPlanner())
    if optimizer is not None:
        _set_optimizer_step_count(optimizer, meta.get("optimizer_step", 0.0))
    if scheduler is not None and meta.get("scheduler") is not None:
        scheduler.load_state_dict(meta["scheduler"])
    world = dist.get_world_size() if dist.is_initialized() else 1
    extra_path = os.path.join(path, "extra", f"rank_{_rank():05d}.pt")
    if meta.get("world_size") == world and os.path.isfile(extra_path):
        return torch.load(extra_path, weights_only=True)
    return None


def load_extra_of_rank(path: str, rank: int) -> dict:
    return torch.load(os.path.join(path, "extra", f"rank_{rank:05d}.pt"), weights_only=True)
