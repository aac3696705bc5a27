"""The model's sharded_state_dict() in torch.distributed.checkpoint (DCP) terms.

DESIGN §9: Megatron's dist_checkpointing is CUDA-bound in 0.16.1, while DCP runs on CPU (gloo)
and GPU and reshards on load. This turns each Megatron ShardedTensor (key, global shape, this
rank's offset, a view of the parameter) into a torch ShardedTensor that DCP can save and load:

    import torch.distributed.checkpoint as dcp
    dcp.save({"model": dcp_state_dict(model, for_save=True)}, checkpoint_id=path)
    dcp.load({"model": dcp_state_dict(model)}, checkpoint_id=path)   # any TP/PP/CP/DP layout

Saving writes only main replicas (one copy of TP-replicated and DP/CP-replicated tensors);
loading reads every rank's own slice, replicas included, straight into the parameters (the
shards are views of them). Keys are the canonical keys of mdn_scale.model.sharding.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import is_main_replica
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard
from torch.distributed._shard.sharded_tensor import ShardedTensor as TorchShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

from .sharding import _model_chunks, flat_sharded_tensors


def _subtract(box, cut):
    """Box minus box, as disjoint boxes. A box is (offsets, sizes)."""
    (o, n), (co, cn) = box, cut
    lo = [max(a, b) for a, b in zip(o, co)]
    hi = [min(a + x, b + y) for a, x, b, y in zip(o, n, co, cn)]
    if any(l >= h for l, h in zip(lo, hi)):
        return [box]
    out, o, n = [], list(o), list(n)
    for d in range(len(o)):  # peel off the parts before / after the cut along each dim
        if o[d] < lo[d]:
            out.append((o[:d] + [o[d]] + o[d + 1:], n[:d] + [lo[d] - o[d]] + n[d + 1:]))
        if o[d] + n[d] > hi[d]:
            out.append((o[:d] + [hi[d]] + o[d + 1:], n[:d] + [o[d] + n[d] - hi[d]] + n[d + 1:]))
        o[d], n[d] = lo[d], hi[d] - lo[d]
    return out


def _filler(shape, pieces):
    """Disjoint boxes covering what `pieces` leave of the tensor."""
    rest = [([0] * len(shape), list(shape))]
    for p in pieces:
        rest = [r for box in rest for r in _subtract(box, p)]
    return rest


def dcp_state_dict(model, *, for_save: bool = False) -> dict:
    """{canonical key: torch ShardedTensor holding this rank's pieces} for DCP save / load.

    model: a module or a list of modules (virtual pipeline chunks). No collectives: each rank
    describes only its own pieces (DCP's planners merge them). Load under torch.no_grad()."""
    rank = dist.get_rank()
    groups: dict[str, list] = {}
    for chunk in _model_chunks(model):
        for sh in flat_sharded_tensors(chunk.sharded_state_dict()):
            groups.setdefault(sh.key, []).append(sh)
    out = {}
    for key, pieces in groups.items():
        mine = [p for p in pieces if not for_save or is_main_replica(p.replica_id)]
        if not mine:
            continue  # another rank writes this tensor
        shards, metas = [], []
        for p in mine:
            sizes = [1] * p.prepend_axis_num + list(p.local_shape)
            data = p.data.detach().reshape(sizes)  # a view: loading writes into the parameter
            meta = ShardMetadata(shard_offsets=list(p.global_offset), shard_sizes=sizes,
                                 placement=f"rank:{rank}/{data.device}")
            shards.append(Shard(tensor=data, metadata=meta))
            metas.append(meta)
        props = TensorProperties(dtype=mine[0].data.dtype, layout=torch.strided,
                                 requires_grad=False, memory_format=torch.contiguous_format,
                                 pin_memory=False)
        # torch's ShardedTensor insists that its metadata cover the whole tensor; DCP reads and
        # writes only a rank's local shards. So the rest is described as placeholder pieces
        # on another rank, which nobody reads or writes: no collectives, replicas allowed.
        shape = list(mine[0].global_shape)
        other = (rank + 1) % dist.get_world_size()
        fill = [ShardMetadata(shard_offsets=o, shard_sizes=n, placement=f"rank:{other}/{mine[0].data.device}")
                for o, n in _filler(shape, [(m.shard_offsets, m.shard_sizes) for m in metas])]
        if other == rank and fill:
            raise RuntimeError(f"{key}: a single rank holds only part of the tensor")
        md = ShardedTensorMetadata(shards_metadata=metas + fill, size=torch.Size(shape),
                                   tensor_properties=props)
        out[key] = TorchShardedTensor._init_from_local_shards_and_global_metadata(shards, md)
    return out
