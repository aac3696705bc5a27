"""A startup check of context parallelism on this machine: the first MDN layer of the model under
CP against the same layer with the whole sequence on one rank, before any training step.

Why: on some lent H100 machines every 16-bit whole-model CP run gave wrong gradients (grad norm
6e6 or NaN where CP = 1 gives ~5) while on others every one was right, with the same code
(BENCHMARKS.md, sessions 5-7). Session 7 traced it to two of our Triton kernels compiled with
Hopper's asynchronous MMA (wgmma): the state pass's backward and the CP group maps. They now
compile without it (mdn_kernels.mdn.wgmma, MDN_NO_WGMMA), and the same machine's CP steps were
right. This check stays as the guard for what is not understood yet: embedding → decoder
layer 0 on random tokens, forward and backward under the run's precision, CP-sliced on every CP
rank (gradients summed over the group) and whole on every rank with the layer's CP turned off.
A run whose CP is wrong stops here with an error that names the worst parameter, instead of
training on wrong gradients. It costs one layer's forward and backward on `tokens` tokens. It
is a smoke check, not a proof: on the wrong machine of session 7 it caught the 1.3B fault (inf)
and passed the 400M one (9.7e-3) whose trainer steps then gave grad norms of 7.7e3.

Bounds: bf16 CP against bf16 CP = 1 differs by bf16 rounding (worst parameter 0.016 in the
whole-model GPU test on the right machines, 0.06 to 4.6 on the wrong ones): 0.05. fp32: 1e-3
(2.5e-5 measured). Only the first pipeline stage holds the embedding; the other stages join the
final agreement (one all-reduce over the world) so every rank raises or none does.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

TOLERANCE = {"bf16": 5e-2, "fp32": 1e-3}


class CPCheckError(RuntimeError):
    """Context parallelism gives other gradients than one rank on this machine."""


def _unwrap(model):
    model = model[0] if isinstance(model, (list, tuple)) else model
    while hasattr(model, "module"):
        model = model.module
    return model


def first_mdn_layer(model):
    """(gpt_model, decoder layer 0) when this stage has the embedding and layer 0 is an MDN
    layer; None otherwise."""
    from mdn_scale.model.mixer import MDNMixer

    m = _unwrap(model)
    if not getattr(m, "pre_process", False) or not len(getattr(m.decoder, "layers", [])):
        return None
    layer = m.decoder.layers[0]
    return (m, layer) if isinstance(getattr(layer, "self_attention", None), MDNMixer) else None


def _layer_grads(m, layer, ids, precision: str) -> dict:
    from .step import autocast

    params = [(n, p) for n, p in layer.named_parameters() if p.requires_grad]
    for p in m.parameters():
        p.grad = None
    with autocast(precision, ids.device):
        h = m.embedding(input_ids=ids, position_ids=None)
        out = layer(hidden_states=h, attention_mask=None)
    out = out[0] if isinstance(out, tuple) else out
    out.float().pow(2).sum().backward()
    grads = {n: p.grad.detach().float().clone() for n, p in params if p.grad is not None}
    for p in m.parameters():
        p.grad = None
    return grads


def check_tokens(seq_len: int, cp: int, chunk_size: int, cap: int = 8192) -> int:
    """The check's sequence: the run's seq_len up to `cap` (whole-model CP went wrong at 8192
    tokens), a multiple of cp × chunk_size."""
    unit = cp * chunk_size
    return max(unit, min(seq_len, cap) // unit * unit)


def check_cp_layer(model, cp_group, *, tokens: int, vocab_size: int, precision: str,
                   device: torch.device, seed: int = 0, tolerance: float | None = None,
                   raise_on_failure: bool = True) -> dict:
    """Run the check on every rank of the world (collective); returns {"passed", "checked",
    "worst", "worst_error", "world_worst_error", "tolerance", "tokens"} and, with
    raise_on_failure, raises CPCheckError when CP's gradients of layer 0 differ from one rank's
    by more than `tolerance` (default TOLERANCE[precision]) on any rank (benchmarks record the
    failure instead: "error").

    tokens: the whole check sequence, a multiple of the CP size (and of the MDN chunk size per
    rank: the caller's job, as for training)."""
    R = cp_group.size()
    if tokens % R:
        raise ValueError(f"cp check: tokens = {tokens} is not divisible by the CP size {R}")
    tol = TOLERANCE[precision] if tolerance is None else tolerance
    found = first_mdn_layer(model)
    worst_name, worst = None, -1.0
    if found is not None:
        m, layer = found
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab_size, (1, tokens), generator=g).to(device)
        n = tokens // R
        r = cp_group.rank()
        got = _layer_grads(m, layer, ids[:, r * n:(r + 1) * n].contiguous(), precision)
        for gr in got.values():
            dist.all_reduce(gr, group=cp_group)
        with layer.self_attention.without_context_parallel():
            ref = _layer_grads(m, layer, ids, precision)
        if got.keys() != ref.keys():   # not raised here: the other stages wait in the agreement
            worst_name = f"gradients for different parameters: {sorted(got.keys() ^ ref.keys())}"
            worst = float("inf")
        for name in ref.keys() & got.keys():
            a, b = got[name].double(), ref[name].double()
            err = float((a - b).norm() / b.norm().clamp_min(1e-30))
            if err != err or not torch.isfinite(a).all():
                err = float("inf")
            if err > worst:
                worst_name, worst = name, err
    # every rank of the world agrees (stages without the embedding send -1)
    t = torch.tensor([worst], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    world_worst = float(t.item())
    report = {"passed": world_worst <= tol, "checked": found is not None, "worst": worst_name,
              "worst_error": worst, "world_worst_error": world_worst, "tolerance": tol,
              "tokens": tokens}
    if world_worst > tol:
        where = (f"worst here: {worst_name} at {worst:.3g}" if found is not None
                 else "on another pipeline stage's ranks")
        report["error"] = (
            f"context parallelism gives other gradients than one rank on this machine: layer 0's "
            f"relative error {world_worst:.3g} > {tol:g} ({precision}, {tokens} tokens over "
            f"{R} ranks; {where}). On some H100 machines 16-bit CP was wrong with the same code "
            f"until two kernels were compiled without Hopper's wgmma (BENCHMARKS.md, session 7): "
            f"check MDN_NO_WGMMA (unset or 'default', or 'all'), train without CP or on another "
            f"machine; train.cp_check=false skips this check.")
        if raise_on_failure:
            raise CPCheckError(report["error"])
    return report


def check_run(cfg, layout, model, *, raise_on_failure: bool = True) -> dict:
    """check_cp_layer for a run config and its layout (the trainer's and bench_model's call)."""
    from megatron.core import parallel_state as ps

    return check_cp_layer(model, ps.get_context_parallel_group(),
                          tokens=check_tokens(cfg.train.seq_len, layout.cp, cfg.model.chunk_size),
                          vocab_size=cfg.model.vocab_size, precision=cfg.train.precision,
                          device=layout.device, seed=cfg.seed, raise_on_failure=raise_on_failure)
