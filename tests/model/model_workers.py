"""Code that runs inside the spawned gloo processes of the model tests."""
from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.packed_seq_params import PackedSeqParams
from mdn_scale.model.attention import all_gather_sequence

from mdn_scale.model import ModelConfig, build_model
from mdn_scale.model.sharding import flat_sharded_tensors, gather_full_state_dict, load_full_state_dict

DTYPE = torch.float64  # layouts must agree to rounding: compare in float64


def device() -> torch.device:
    """The GPU of this rank when the harness runs on CUDA (tests/gpu), else the CPU."""
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        torch.cuda.set_device(dist.get_rank() % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_parallel(tp=1, pp=1, cp=1):
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 context_parallel_size=cp)


def make_model(cfg: dict, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if device().type == "cuda":  # Megatron's GPU init draws from its TP-aware CUDA RNG tracker
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
        model_parallel_cuda_manual_seed(seed)
    return build_model(ModelConfig(**cfg), params_dtype=DTYPE, **overrides)


def full_grads(model) -> dict:
    """Gradients in the canonical (layout-independent) form of gather_full_state_dict."""
    params = [p for p in model.parameters()]
    saved = [p.data for p in params]
    for p in params:
        p.data = p.grad if p.grad is not None else torch.zeros_like(p.data)
    try:
        return gather_full_state_dict(model)
    finally:
        for p, d in zip(params, saved):
            p.data = d


def packed_params(cu):
    cu = torch.tensor(cu, dtype=torch.int32)
    mx = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=mx, max_seqlen_kv=mx)


def run_step(model, ids, labels, packed=None):
    """Logits ([B, S, V], gathered over TP) and Megatron's per-token loss [B, S]; then backward of
    a float64 cross-entropy sum of the logits (Megatron's loss casts logits to fp32, which
    would hide layout differences below fp32 rounding)."""
    model.zero_grad(set_to_none=True)
    dev = device()
    ids, labels = ids.to(dev), labels.to(dev)
    if packed is not None:
        packed.cu_seqlens_q = packed.cu_seqlens_kv = packed.cu_seqlens_q.to(dev)
    with torch.no_grad():
        loss = model(ids, None, None, labels=labels, packed_seq_params=packed)
    out = model(ids, None, None, packed_seq_params=packed)  # [B, S, V/TP]
    g = ps.get_tensor_model_parallel_group()
    if g.size() > 1:  # differentiable gather of the vocab shards (Megatron's allocates on CUDA)
        out = all_gather_sequence(out.movedim(-1, 0).contiguous(), g).movedim(0, -1)
    full = out
    ce = torch.nn.functional.cross_entropy(full.reshape(-1, full.shape[-1]), labels.reshape(-1),
                                           reduction="sum")
    # Every TP rank computes the same loss and the gather's backward sums over ranks: divide
    # (by a power of two, exact) so the gradient is that of one copy of the loss.
    (ce / g.size()).backward()
    return full.detach().cpu(), loss.cpu()


def replicated_grads_agree(model, group) -> list[str]:
    """Names of TP-replicated parameters whose gradient differs between TP ranks."""
    bad = []
    if group.size() == 1:
        return bad
    for name, p in model.named_parameters():
        if getattr(p, "tensor_model_parallel", False) or p.grad is None:
            continue
        parts = [torch.empty_like(p.grad) for _ in range(group.size())]
        dist.all_gather(parts, p.grad.contiguous(), group=group)
        if any(not torch.equal(parts[0], x) for x in parts[1:]):
            bad.append(name)
    return bad


def allreduce_sequence_parallel_grads(model, group):
    """What Megatron's finalize_model_grads does for norm weights under SP."""
    for p in model.parameters():
        if getattr(p, "sequence_parallel", False) and p.grad is not None:
            dist.all_reduce(p.grad, group=group)


# ---------------------------------------------------------------------------------------------
def reference_worker(rank, world, cases):
    """TP=PP=CP=1: weights, logits, loss and grads for each case (name, cfg, ids, labels, cu)."""
    init_parallel()
    out = {}
    for name, cfg, ids, labels, cu in cases:
        model = make_model(cfg, seed=0)
        logits, loss = run_step(model, ids, labels, packed_params(cu) if cu else None)
        out[name] = dict(weights=gather_full_state_dict(model), logits=logits, loss=loss,
                         grads=full_grads(model))
    return out


def tp_worker(rank, world, cases, refs, sequence_parallel_modes):
    init_parallel(tp=world)
    tp_group = ps.get_tensor_model_parallel_group()
    out = {}
    for name, cfg, ids, labels, cu in cases:
        for sp in sequence_parallel_modes:
            model = make_model(cfg, seed=1, sequence_parallel=sp)
            load_full_state_dict(model, refs[name]["weights"])
            logits, loss = run_step(model, ids, labels, packed_params(cu) if cu else None)
            if sp:
                allreduce_sequence_parallel_grads(model, tp_group)
            out[(name, sp)] = dict(logits=logits, loss=loss, grads=full_grads(model),
                                   disagree=replicated_grads_agree(model, tp_group),
                                   weights=gather_full_state_dict(model))
    return out


def cp_worker(rank, world, cases, refs, tp=1):
    """CP=world/tp (× TP=tp): each CP rank feeds its contiguous slice; returns its slice of
    logits/loss and the CP-summed grads."""
    init_parallel(tp=tp, cp=world // tp)
    g = ps.get_context_parallel_group()
    rank = g.rank()
    world = g.size()
    out = {}
    for name, cfg, ids, labels, cu in cases:
        model = make_model(cfg, seed=1)
        load_full_state_dict(model, refs[name]["weights"])
        S = ids.shape[1] // world
        sl = slice(rank * S, (rank + 1) * S)
        logits, loss = run_step(model, ids[:, sl], labels[:, sl], packed_params(cu) if cu else None)
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=g)
        out[name] = dict(logits=logits, loss=loss, grads=full_grads(model), cp_rank=rank)
    return out


def pp_worker(rank, world, cfg, ids, labels, ref_weights):
    """PP=world: where each layer / embedding / head lives, and a hand-driven forward
    (activations sent rank to rank) that must give the PP=1 loss. Also the stages' own fresh
    weights at the reference's seed (init must not depend on the layout)."""
    init_parallel(pp=world)
    fresh = gather_full_state_dict(make_model(cfg, seed=0))
    model = make_model(cfg, seed=1)
    sd_keys = sorted(sh.key for sh in flat_sharded_tensors(model.sharded_state_dict()))
    layout = dict(
        layers=[layer.layer_number - 1 for layer in model.decoder.layers],
        layer_types=[type(layer.self_attention).__name__ for layer in model.decoder.layers],
        embedding=hasattr(model, "embedding"),
        output_layer=hasattr(model, "output_layer"),
        final_norm=getattr(model.decoder, "final_layernorm", None) is not None,
        keys=sd_keys,
        fresh=fresh,
    )
    load_full_state_dict(model, ref_weights)
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    if not first:
        B, S = ids.shape
        h = torch.empty(S, B, cfg["hidden_size"], dtype=DTYPE)
        dist.recv(h, src=rank - 1)
        model.set_input_tensor(h)
    with torch.no_grad():
        res = model(ids, None, None, labels=labels if last else None)
    if not last:
        dist.send(res.contiguous(), dst=rank + 1)
        layout["loss"] = None
    else:
        layout["loss"] = res
    return layout


def chunked_loss_worker(rank, world, tp, cfg, ids, labels, token_weights, chunks, sequence_parallel=False):
    """TP=tp: the per-token loss and every parameter's gradient of sum(weights · loss) for
    (a) a float64 cross entropy of the (TP-gathered) logits, (b) Megatron's unchunked output
    layer + vocab-parallel cross entropy, (c) the chunked loss at each chunk size. Gradients are
    this rank's shards (the three paths share one model, so shards line up)."""
    init_parallel(tp=tp)
    g = ps.get_tensor_model_parallel_group()
    dev = device()
    model = make_model(cfg, seed=0, **({"sequence_parallel": True} if sequence_parallel else {})).to(dev)
    ids, labels, token_weights = ids.to(dev), labels.to(dev), token_weights.to(dev)

    def grads():
        return {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    out = model(ids, None, None)  # logits [B, S, V/TP]
    if g.size() > 1:
        out = all_gather_sequence(out.movedim(-1, 0).contiguous(), g).movedim(0, -1)
    ce = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), labels.reshape(-1),
                                           reduction="none").view(labels.shape)
    ((ce * token_weights).sum() / g.size()).backward()
    res = {"ref": (ce.detach().cpu(), grads())}
    for chunk in (0, *chunks):
        model.loss_chunk_tokens = chunk
        model.zero_grad(set_to_none=True)
        loss = model(ids, None, None, labels=labels)
        (loss * token_weights).sum().backward()
        res["megatron" if chunk == 0 else chunk] = (loss.detach().cpu(), grads())
    return res


def count_saved_bytes(model, ids, labels, packed, device_type: str) -> int:
    """Bytes autograd holds for the backward after one forward with labels under bf16 autocast:
    unique storages, parameters excluded; the saved tensors (hooks) and any tensor a custom
    Function keeps as a ctx attribute (held for the backward, unseen by the hooks; the MDN op's
    Functions keep none since session 4: under recompute such a tensor outlives the layer)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(device_type, dtype=torch.bfloat16):
            loss = model(ids, None, None, labels=labels, packed_seq_params=packed)
    todo, done = [loss.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in done:
            continue
        done.add(node)
        for v in getattr(node, "__dict__", {}).values():
            if isinstance(v, torch.Tensor) and v.untyped_storage().data_ptr() not in params:
                seen[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
        todo += [f for f, _ in node.next_functions]
    return sum(seen.values())


def saved_bytes_fused_gates_worker(rank, world, cfg, runs):
    """saved_bytes_worker with the mixer's Triton gate kernels (gate_kernels.py, under
    TRITON_INTERPRET=1), which the model takes on CUDA only: use_fused_gates forced on."""
    from mdn_scale.model import mixer_kernels as mk

    orig = mk.use_fused_gates
    mk.use_fused_gates = lambda choice, x, params: True
    try:
        return saved_bytes_worker(rank, world, cfg, runs)
    finally:
        mk.use_fused_gates = orig


def saved_bytes_worker(rank, world, cfg, runs):
    """count_saved_bytes on the CPU for each (num_layers, T, loss_chunk_tokens) run."""
    init_parallel()  # TP = 1 (any world size: each rank counts the same thing)
    out = {}
    for num_layers, T, chunk in runs:
        torch.manual_seed(0)
        model = build_model(ModelConfig(**dict(cfg, num_layers=num_layers, loss_chunk_tokens=chunk)),
                            use_cpu_initialization=True)
        g = torch.Generator().manual_seed(T)
        ids = torch.randint(0, cfg["vocab_size"], (1, T), generator=g)
        labels = torch.randint(0, cfg["vocab_size"], (1, T), generator=g)
        out[(num_layers, T, chunk)] = count_saved_bytes(model, ids, labels, packed_params([0, T]), "cpu")
    return out


def attention_cp_worker(rank, world, cases):
    """SDPACoreAttention alone under CP=world (thd inputs, float64): each rank its contiguous
    slice of the packed stream. cases: [(name, cu list, q, k, v, grad_out, limits)] with full
    [T, h, D] tensors; per (name, limit) of MAX_MASK_ELEMENTS: this rank's output and the
    gradients of its q, k, v slices."""
    from types import SimpleNamespace
    from mdn_scale.model import attention as attn
    cp = SimpleNamespace(cp=dist.group.WORLD)
    default, out = attn.MAX_MASK_ELEMENTS, {}
    try:
        for name, cu, q, k, v, grad, limits in cases:
            S = q.shape[0] // world
            sl = slice(rank * S, rank * S + S)
            for limit in limits:
                attn.MAX_MASK_ELEMENTS = default if limit is None else limit
                core = attn.SDPACoreAttention(None, pg_collection=cp)
                qs, ks, vs = (t[sl].clone().requires_grad_() for t in (q, k, v))
                y = core(qs, ks, vs, None, packed_seq_params=packed_params(cu))
                y.backward(grad[sl])
                out[(name, limit)] = dict(out=y.detach(), dq=qs.grad, dk=ks.grad, dv=vs.grad)
    finally:
        attn.MAX_MASK_ELEMENTS = default
    return out


def stage_output_dtype_worker(rank, world, cfg):
    """A first pipeline stage (embedding and layers, no head) on one rank: the dtype of what it
    sends on, under each precision, beside mdn_scale.train.step.pipeline_dtype's receive dtype."""
    from mdn_scale.train.step import autocast, pipeline_dtype
    init_parallel()
    torch.manual_seed(0)
    model = build_model(ModelConfig(**cfg), post_process=False, use_cpu_initialization=True)
    T = cfg["seq_len"]
    ids = torch.randint(0, cfg["vocab_size"], (1, T), generator=torch.Generator().manual_seed(1))
    out = {}
    for precision in ("bf16", "fp32"):
        with autocast(precision, torch.device("cpu")):
            h = model(ids, None, None, packed_seq_params=packed_params([0, T // 3, T]))
        out[precision] = (h.dtype, tuple(h.shape), pipeline_dtype(precision, model.config.params_dtype))
    return out


def _megatron_schedules_on_cpu():
    """Megatron's pipeline schedules put their receive buffers and token counters on 'cuda'
    (torch.cuda.current_device(), device="cuda") and synchronize the device after batched p2p;
    in a CPU worker process those become the CPU and no-ops, so the schedules' real ordering and
    p2p pairing run over gloo. (Only in the spawned test process: nothing else runs there.)"""
    zeros = torch.zeros

    def cpu_zeros(*a, **k):
        if str(k.get("device", "")).startswith("cuda"):
            k["device"] = "cpu"
        return zeros(*a, **k)

    torch.zeros = cpu_zeros
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None


def _pipeline_chunks(cfg, pp, vp):
    """This rank's model chunks (float64, seeded) under PP = pp, interleaved with vp > 1 chunks,
    Megatron's schedules made to run on the CPU."""
    from mdn_scale.model import to_transformer_config

    _megatron_schedules_on_cpu()
    ps.initialize_model_parallel(pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vp if vp > 1 else None)
    m = ModelConfig(**cfg)
    kw = dict(params_dtype=DTYPE, use_cpu_initialization=True)
    if vp > 1:
        kw["virtual_pipeline_model_parallel_size"] = vp
    config = to_transformer_config(m, tensor_parallel=1, pipeline_parallel=pp, context_parallel=1, **kw)
    torch.manual_seed(0)
    return [build_model(m, config=config, vp_stage=v if vp > 1 else None) for v in range(vp)]


def schedule_worker(rank, world, cfg, pp, vp, microbatches):
    """mdn_scale.train.step.forward_backward under Megatron's schedules (PP = pp; interleaved
    with vp > 1 model chunks per rank; pp = 1: the plain loop) on CPU, float64 weights, fp32
    precision: the loss and every parameter's gradient by its global name."""
    from mdn_scale.train import step

    chunks = _pipeline_chunks(cfg, pp, vp)
    loss = step.forward_backward(chunks if vp > 1 else chunks[0], microbatches,
                                 global_tokens=float(sum(mb["loss_mask"].sum() for mb in microbatches)),
                                 precision="fp32", device=torch.device("cpu"), loss_group=None)
    grads = {}
    for c in chunks:
        grads.update(full_grads(c))
    return {"loss": loss, "grads": grads}


def evaluate_worker(rank, world, cfg, pp, vp, batches):
    """mdn_scale.train.step.evaluate on CPU (float64 weights, fp32): PP = pp (interleaved with
    vp > 1), Megatron's forward-only schedule; every rank's value, and whether the chunks are
    back in training mode."""
    from mdn_scale.train import step

    chunks = _pipeline_chunks(cfg, pp, vp)
    val = step.evaluate(chunks if vp > 1 else chunks[0], batches, precision="fp32",
                        device=torch.device("cpu"), loss_group=None)
    return {"val": val, "training": [c.training for c in chunks],
            "grads": [p.grad is None for c in chunks for p in c.parameters()]}
