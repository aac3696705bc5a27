"""Read a DeepSpeed ZeRO checkpoint (stage 1, 2 or 3, any world size) into full tensors: the
fp32 master weights and Adam moments of every parameter, under the model's parameter names.

Used by the DeepSpeed backend (``checkpoint.load`` from a DeepSpeed run, whatever its world size)
and by tools/convert_deepspeed_checkpoint.py (to our DCP format, full weights, the HF layout).
The files are read with ``torch.load(weights_only=True)``: besides tensors and plain values they
hold three DeepSpeed classes (an enum, a named tuple, the loss scaler), allowed by name and built
without running code from the file.

How ZeRO lays out its partitions (DeepSpeed 0.19; facts read from its checkpoint files and
``deepspeed/utils/zero_to_fp32.py``; ``param_shapes`` in the model-states file lists, per
optimizer group, parameter name → shape in flattening order):

* stage 1/2: per group, one flat fp32 vector over all parameters of the group (each followed by
  its ``param_alignment_paddings`` entry, the group by ``group_paddings``) cut into W equal
  consecutive pieces; rank r holds piece r (``single_partition_of_fp32_groups[g]``).
* stage 3: every parameter is cut on its own into W pieces of ceil(n / W) elements (the last
  padded); rank r's flat vector (``fp32_flat_groups``, groups concatenated) holds its piece of
  each parameter in order.

The Adam moments (``exp_avg``, ``exp_avg_sq``) of a group have exactly the layout of its fp32
vector on each rank.
"""

from __future__ import annotations

import glob
import math
import os
import re

import torch

OPTIM_FILE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
MOMENTS = ("exp_avg", "exp_avg_sq")


def _safe_load(path: str):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([ZeroStageEnum, fragment_address, LossScaler]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # an unexpected class: refuse rather than unpickle it
            raise ValueError(f"{path}: not loadable as plain tensors and values ({e})") from e


def _optim_files(path: str) -> list[str]:
    found = sorted(((int(m.group(1)), os.path.join(path, n)) for n in os.listdir(path)
                    if (m := OPTIM_FILE.match(n))))
    ranks = [r for r, _ in found]
    if not found or ranks != list(range(len(found))):
        raise ValueError(f"{path}: expected zero_pp_rank_<r>_mp_rank_00_optim_states.pt for "
                         f"r = 0..W-1, found ranks {ranks} (a model-parallel or incomplete save?)")
    return [f for _, f in found]


def _param_shapes(path: str) -> list[dict[str, torch.Size]]:
    files = sorted(glob.glob(os.path.join(path, "*mp_rank_00_model_states.pt")))
    if not files:
        raise ValueError(f"{path}: no DeepSpeed model-states file (*mp_rank_00_model_states.pt)")
    shapes = _safe_load(files[0]).get("param_shapes")
    if not shapes:
        raise ValueError(f"{files[0]}: no param_shapes")
    return [{k: torch.Size(v) for k, v in group.items()} for group in shapes]


def _group_state(osd: dict, stage: int) -> dict:
    return osd["base_optimizer_state"]["state"] if stage <= 2 else osd["optimizer_state_dict"]["state"]


def read_zero_checkpoint(path: str, *, moments: bool = True):
    """(weights, moments, optimizer_step, zero_stage): ``weights[name]`` fp32 full tensors;
    ``moments[name] = {"exp_avg": ..., "exp_avg_sq": ...}`` (empty when ``moments=False``)."""
    shapes = _param_shapes(path)
    osds = [_safe_load(f)["optimizer_state_dict"] for f in _optim_files(path)]
    world = len(osds)
    stage = int(getattr(osds[0]["zero_stage"], "value", osds[0]["zero_stage"]))
    kinds = ("fp32",) + (MOMENTS if moments else ())
    weights, moms = {}, {}
    step = 0.0

    def flat(osd, g, kind):
        if kind == "fp32":
            return osd["single_partition_of_fp32_groups" if stage <= 2 else "fp32_flat_groups"][g]
        return _group_state(osd, stage)[g][kind]

    if stage <= 2:
        paddings = osds[0].get("param_alignment_paddings")
        for g, group in enumerate(shapes):
            full = {k: torch.cat([flat(o, g, k).detach().float() for o in osds]) for k in kinds}
            off = 0
            for i, (name, shape) in enumerate(group.items()):
                n = shape.numel()
                for k in kinds:
                    piece = full[k][off:off + n].view(shape).clone()
                    if k == "fp32":
                        weights[name] = piece
                    else:
                        moms.setdefault(name, {})[k] = piece
                off += n + (paddings[g][i] if paddings else 0)
            if off > full["fp32"].numel():
                raise ValueError(f"{path}: group {g} needs {off} elements, the partitions hold "
                                 f"{full['fp32'].numel()}")
    else:
        per_rank = {k: [torch.cat([flat(o, g, k).detach().float() for g in range(len(shapes))]) for o in osds]
                    for k in kinds}
        off = 0
        for group in shapes:
            for name, shape in group.items():
                n = shape.numel()
                part = math.ceil(n / world)
                for k in kinds:
                    piece = torch.cat([r[off:off + part] for r in per_rank[k]])[:n].view(shape).clone()
                    if k == "fp32":
                        weights[name] = piece
                    else:
                        moms.setdefault(name, {})[k] = piece
                off += part
        if off != per_rank["fp32"][0].numel():
            raise ValueError(f"{path}: parameters take {off} elements per rank, the partitions "
                             f"hold {per_rank['fp32'][0].numel()}")
    if moments:
        st = _group_state(osds[0], stage)
        step = float(next(iter(st.values()))["step"]) if st else 0.0
    return weights, moms, step, stage


def _with_pad_rows(w: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A weight saved without the parameter's zero alignment rows (the mixer's in-projection
    before model.in_proj_row_multiple existed) gets them back; any other weight is returned."""
    pad = getattr(p, "pad_rows", 0)
    if pad and w.dim() == p.dim() and w.shape[0] + pad == p.shape[0] and w.shape[1:] == p.shape[1:]:
        return torch.cat([w, w.new_zeros((pad,) + tuple(w.shape[1:]))])
    return w


def load_weights_into(model: torch.nn.Module, weights: dict[str, torch.Tensor], path: str) -> None:
    """Copy full weights (parameter names of the unwrapped model) into ``model``; every parameter
    must be present with its shape, and no name may be unknown. An in-projection saved without
    its alignment rows (an older checkpoint) is accepted and padded with zeros."""
    params = dict(model.named_parameters())
    weights = {n: _with_pad_rows(w, params[n]) if n in params else w for n, w in weights.items()}
    problems = [f"missing {n} {tuple(p.shape)}" for n, p in params.items() if n not in weights]
    problems += [f"{n}: checkpoint shape {tuple(w.shape)}, the model {tuple(params[n].shape)}"
                 for n, w in weights.items() if n in params and w.shape != params[n].shape]
    problems += [f"unknown parameter {n}" for n in weights if n not in params]
    if problems:
        raise ValueError(f"{path} does not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n].to(p.dtype))
