"""How parameters are split across ranks, in Megatron's ShardedTensor terms, and two helpers on
top of it: gather a model's full ("canonical", layout-independent) state dict and load one.

The canonical form is what `sharded_state_dict()` describes: one full tensor per ShardedTensor
key (fused tensors split into their parts; per-layer keys with global layer numbers). It is the
same under every TP/PP/CP/DP layout, so it is the interchange format of tools/convert_checkpoint.py
and of the layout tests. (The trainer's checkpoints use the same ShardedTensor metadata.)
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
    is_main_replica,
)


def split_sharded_tensor(sh: ShardedTensor, sizes: list[int], names: list[str], dim: int = 0,
                         skip: tuple = ()):
    """A factory that stores a fused local tensor as separate parts `{key}.{name}`, each one
    sharded like the original along `dim` (e.g. the mixer's per-rank [q|k|v|...] rows). Parts
    named in `skip` are not stored (the mixer's alignment pad) and merge back as zeros."""
    if sum(sizes) != sh.local_shape[dim]:
        raise ValueError(f"{sh.key}: parts {dict(zip(names, sizes))} do not add up to the local "
                         f"size {sh.local_shape[dim]} along dim {dim}")
    template = sh.without_data()

    @torch.no_grad()
    def build(key, t, replica_id, flattened_range):
        whole = replace(template, key=key, data=t, dtype=t.dtype, replica_id=replica_id,
                        flattened_range=flattened_range)
        out, start = [], 0
        for size, name in zip(sizes, names):
            if name not in skip:
                for piece in whole.narrow(dim, start, size):
                    piece.key = f"{key}.{name}"
                    out.append(piece)
            start += size
        return out

    @torch.no_grad()
    def merge(parts):
        if not skip:
            return torch.cat(parts, dim)
        loaded, out = iter(parts), []
        for size, name in zip(sizes, names):
            if name in skip:
                ref = parts[0]
                out.append(ref.new_zeros(ref.shape[:dim] + (size,) + ref.shape[dim + 1:]))
            else:
                out.append(next(loaded))
        return torch.cat(out, dim)

    return ShardedTensorFactory(sh.key, sh.data, build, merge, sh.replica_id)


def flat_sharded_tensors(sharded_state_dict) -> list[ShardedTensor]:
    """All ShardedTensors of a (nested) sharded state dict, factories expanded (their data are
    views of the parameters). ShardedObjects (extra state) are skipped."""
    out = []

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, ShardedTensorFactory):
            walk(x.build())
        elif isinstance(x, ShardedTensor):
            if x.flattened_range is not None:
                raise ValueError(f"{x.key}: flattened (distributed-optimizer) shards are not "
                                 "supported here; pass the model's sharded_state_dict()")
            out.append(x)
        elif isinstance(x, ShardedObject) or x is None:
            pass
    walk(sharded_state_dict)
    return out


def _slices(sh: ShardedTensor):
    return tuple(slice(o, o + n) for o, n in zip(sh.global_offset, (1,) * sh.prepend_axis_num
                                                 + tuple(sh.local_shape)))


def _model_chunks(model) -> list:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def gather_full_state_dict(model, group=None) -> dict[str, torch.Tensor]:
    """Full tensors of every ShardedTensor key, assembled from all ranks of `group` (default:
    the world). Returns the same dict on every rank (CPU, float32 copies kept in their dtype).
    Small models only: everything travels through all_gather_object."""
    pieces = []
    for chunk in _model_chunks(model):
        for sh in flat_sharded_tensors(chunk.sharded_state_dict()):
            if is_main_replica(sh.replica_id):
                pieces.append((sh.key, tuple(sh.global_shape), tuple(sh.global_offset),
                               sh.prepend_axis_num, sh.data.detach().cpu().clone()))
    if dist.is_initialized() and (group is None or group.size() > 1):
        n = dist.get_world_size(group)
        everything = [None] * n
        dist.all_gather_object(everything, pieces, group=group)
        pieces = [p for ps in everything for p in ps]
    full: dict[str, torch.Tensor] = {}
    filled: dict[str, int] = {}
    for key, gshape, goff, prepend, data in pieces:
        t = full.setdefault(key, torch.zeros(gshape, dtype=data.dtype))
        idx = tuple(slice(o, o + 1) for o in goff[:prepend]) + tuple(
            slice(o, o + n) for o, n in zip(goff[prepend:], data.shape))
        t[idx] = data.reshape(t[idx].shape)
        filled[key] = filled.get(key, 0) + data.numel()
    for key, t in full.items():
        if filled[key] != t.numel():
            raise RuntimeError(f"{key}: shards cover {filled[key]} of {t.numel()} elements")
    return full


@torch.no_grad()
def load_full_state_dict(model, full: dict[str, torch.Tensor], *, strict: bool = True,
                         group=None) -> None:
    """Copy this rank's slice of each full tensor into the model (any TP/PP/CP/DP layout).
    Raises ValueError naming missing keys or mismatched shapes before changing anything.
    strict: also reject keys that no rank of `group` (default: the world) uses; collective
    (all ranks must call it) when torch.distributed is initialised."""
    todo = []
    problems = []
    seen = set()
    for chunk in _model_chunks(model):
        for sh in flat_sharded_tensors(chunk.sharded_state_dict()):
            seen.add(sh.key)
            if sh.key not in full:
                problems.append(f"missing {sh.key} (expected shape {tuple(sh.global_shape)})")
                continue
            src = full[sh.key]
            if tuple(src.shape) != tuple(sh.global_shape):
                problems.append(f"{sh.key}: shape {tuple(src.shape)} but the model needs "
                                f"{tuple(sh.global_shape)}")
                continue
            todo.append((sh, src))
    if strict:
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            everyone = [None] * dist.get_world_size(group)
            dist.all_gather_object(everyone, seen, group=group)
            seen = set().union(*everyone)
        extra = sorted(set(full) - seen)
        if extra:
            problems.append(f"unexpected keys {extra}")
    if problems:
        raise ValueError("state dict does not fit the model: " + "; ".join(problems))
    for sh, src in todo:
        piece = src[_slices(sh)].reshape(sh.data.shape)
        sh.data.copy_(piece.to(dtype=sh.data.dtype, device=sh.data.device))
