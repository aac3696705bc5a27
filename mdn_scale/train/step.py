"""One optimizer step's forward/backward over this rank's microbatches.

A microbatch from the data loader holds ``micro_batch`` packed sequences; they are flattened to
one stream of B·T tokens (B = 1 for the model, document boundaries in ``cu_seqlens``), and under
context parallelism each CP rank keeps its contiguous slice (``cp_slice``). The loss of a
microbatch is its masked per-token loss *sum* divided by the token count of the whole global
batch (all microbatches of all dp×cp ranks), so the gradients summed over dp×cp are those of the
token-weighted mean loss, whatever the layout or microbatch split (DESIGN.md §7, §8).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


def to_model_inputs(mb: dict, device: torch.device) -> dict:
    """[B, T] tensors (or a CP slice) → model inputs with B = 1 and packed-sequence params."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from mdn_kernels.mdn.layout import device_copy_of_host

    tokens = mb["tokens"].reshape(1, -1).to(device, non_blocking=True)
    labels = mb["labels"].reshape(1, -1).to(device, non_blocking=True)
    mask = mb["loss_mask"].reshape(1, -1).to(device, dtype=torch.float32, non_blocking=True)
    cu_host = mb["cu_seqlens"]
    max_len = int((cu_host[1:] - cu_host[:-1]).max()) if cu_host.numel() > 1 else 0  # before the copy: no device sync
    # pinned and non-blocking, its host copy recorded: neither this copy nor the layers' later
    # reads of the offsets on the host (layout, FLA's conv chunks) wait for the GPU
    cu = device_copy_of_host(cu_host.to(torch.int32), device)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                          max_seqlen_q=max_len, max_seqlen_kv=max_len)
    return {"tokens": tokens, "labels": labels, "loss_mask": mask, "packed_seq_params": psp}


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pipeline_dtype(precision: str, params_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the activations (and their gradients) sent between pipeline stages.

    A stage sends its output as it is, but Megatron's schedule receives into buffers of
    `config.pipeline_dtype`: where the two differ the byte counts differ and NCCL waits forever.
    Under bf16 autocast over fp32 weights a stage's output is the residual stream, which is bf16
    after the first layer (Megatron's bias-dropout-add casts the residual to the layer output's
    dtype), so the receive buffers must be bf16, not the fp32 params_dtype: with params_dtype
    PP = 2 hung silently on the H100s (sessions 6 and 7; stage 1 in recv_forward, stage 0 in
    send_forward_recv_backward). tests/model/test_model_pp.py checks a first stage's output
    dtype against this."""
    return torch.bfloat16 if precision == "bf16" else params_dtype


def batch_p2p_comm(chunks: int, pipeline: int) -> bool:
    """Whether Megatron's schedule may batch a step's sends and receives (batch_isend_irecv).

    Not for the interleaved schedule on two stages: there a rank's previous and next stage are
    the same rank, and one call can send an activation forward and a gradient back (the
    wrap-around between virtual stages) to it while receiving both from it. Batched, every op
    goes over one communicator and sends and receives pair up in the order posted, so the
    other rank's activation receive got this rank's gradient: the losses were off from the
    third micro-batch and the grad norm ~5e8 (1.3B, PP = 2, VP = 2, plan s17x2c; the shapes
    match, so nothing fails). Unbatched, Megatron sends the two directions over two
    communicators (_p2p_ops). PP = 4 interleaved and every 1F1B keep the default (equal to
    PP = 1 on the GPU: sessions 8 and 17)."""
    return not (chunks > 1 and pipeline == 2)


def forward_loss_sum(model, inputs: dict, precision: str, device: torch.device) -> torch.Tensor:
    with autocast(precision, device):
        per_token = model(inputs["tokens"], None, None, labels=inputs["labels"],
                          packed_seq_params=inputs["packed_seq_params"])
    return (per_token.float() * inputs["loss_mask"]).sum()


def count_tokens(microbatches: list[dict], group, device: torch.device) -> float:
    """Loss tokens of the global batch: this rank's mask sum, summed over dp×cp. (Collectives
    use tensors on ``device``: NCCL reduces only GPU tensors.)"""
    n = torch.tensor([sum(float(mb["loss_mask"].sum()) for mb in microbatches)],
                     dtype=torch.float64, device=device)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(n, group=group)
    return float(n.item())


def forward_backward(model, microbatches: list[dict], *, global_tokens: float, precision: str,
                     device: torch.device, loss_group) -> float:
    """Accumulate gradients of sum(loss)/global_tokens over ``microbatches`` (already CP-sliced);
    return the token-weighted mean loss over the whole dp×cp group. ``model``: the module of this
    pipeline stage, or a list of model chunks (interleaved pipeline schedule: one chunk per
    virtual stage, in order)."""
    denom = max(global_tokens, 1.0)
    chunks, pipelined = _chunks(model)
    if pipelined:
        total = _forward_backward_pipelined(chunks, microbatches, denom, precision, device)
    else:
        model = chunks[0]
        total = torch.zeros((), dtype=torch.float64, device=device)
        for mb in microbatches:
            inputs = to_model_inputs(mb, device)
            loss_sum = forward_loss_sum(model, inputs, precision, device)
            (loss_sum / denom).backward()
            total += loss_sum.detach().double()
    if loss_group is not None and dist.get_world_size(loss_group) > 1:
        dist.all_reduce(total, group=loss_group)
    return float(total.item()) / denom


def _chunks(model) -> tuple[list, bool]:
    """(this rank's model chunks, whether pipeline parallelism is on): ``model`` is the module of
    this pipeline stage or its list of chunks (interleaved schedule); several need PP."""
    from megatron.core import parallel_state as ps

    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    pipelined = ps.get_pipeline_model_parallel_world_size() > 1
    if len(chunks) != 1 and not pipelined:
        raise ValueError("several model chunks need pipeline parallelism (parallel.pipeline > 1)")
    return chunks, pipelined


def _forward_backward_pipelined(chunks, microbatches, denom, precision, device) -> torch.Tensor:
    """Pipeline parallelism (GPU only): Megatron's 1F1B schedule runs the microbatches through
    the stages (its interleaved schedule when ``chunks`` holds several virtual stages; each chunk
    reads the same microbatches in order). Each last-stage microbatch returns its loss sum / global tokens with
    ``calculate_per_token_loss`` so the schedule applies no further scaling; gradient reduction
    over dp×cp stays ours (grads.finalize_grads). Returns this rank's loss sum (the last stage's,
    shared over the pipeline group so every rank can log it)."""
    return _run_schedule(chunks, microbatches, denom, precision, device, forward_only=False)[0].clone()


def _run_schedule(chunks, microbatches, denom, precision, device, *, forward_only: bool) -> torch.Tensor:
    """Megatron's schedule over ``microbatches`` (see _forward_backward_pipelined); returns
    [loss sum, loss tokens] (float64) of the last stage, summed over the pipeline group so every
    stage holds them. forward_only: no backward (validation)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for config in {id(c.config): c.config for c in chunks}.values():
        config.calculate_per_token_loss = True
        config.pipeline_dtype = pipeline_dtype(precision, config.params_dtype)
        config.finalize_model_grads_func = None
        config.batch_p2p_comm = batch_p2p_comm(len(chunks), ps.get_pipeline_model_parallel_world_size())
    sums = torch.zeros(2, dtype=torch.float64, device=device)

    def forward_step(data_iterator, model):
        inputs = to_model_inputs(next(data_iterator), device)
        with autocast(precision, device):
            output = model(inputs["tokens"], None, None, labels=inputs["labels"],
                           packed_seq_params=inputs["packed_seq_params"])

        def loss_func(per_token):
            loss_sum = (per_token.float() * inputs["loss_mask"]).sum()
            n = inputs["loss_mask"].sum()
            sums[0] += loss_sum.detach().double()
            sums[1] += n.double()
            return loss_sum / denom, n.to(torch.int), {"loss_sum": loss_sum.detach()}

        return output, loss_func

    tokens_per_mb = microbatches[0]["tokens"].numel()  # B·T / cp on this rank
    data = iter(microbatches) if len(chunks) == 1 else [iter(microbatches) for _ in chunks]
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data, model=chunks,
        num_microbatches=len(microbatches),
        seq_length=tokens_per_mb * ps.get_context_parallel_world_size(),
        micro_batch_size=1, forward_only=forward_only)
    dist.all_reduce(sums, group=ps.get_pipeline_model_parallel_group())
    return sums


@torch.no_grad()
def evaluate(model, batches: list[dict], *, precision: str, device: torch.device, loss_group) -> float:
    """Token-weighted mean loss of ``batches`` (CP-sliced) over the dp×cp group. ``model``: the
    module of this pipeline stage, or its list of model chunks; under pipeline parallelism the
    batches run through Megatron's schedule, forward only, and every stage returns the value."""
    chunks, pipelined = _chunks(model)
    was_training = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        if pipelined:
            sums = _run_schedule(chunks, batches, 1.0, precision, device, forward_only=True)
        else:
            sums = torch.zeros(2, dtype=torch.float64, device=device)
            for mb in batches:
                inputs = to_model_inputs(mb, device)
                sums[0] += forward_loss_sum(chunks[0], inputs, precision, device).double()
                sums[1] += inputs["loss_mask"].sum().double()
    finally:
        for c, was in zip(chunks, was_training):
            c.train(was)
    if loss_group is not None and dist.get_world_size(loss_group) > 1:
        dist.all_reduce(sums, group=loss_group)
    return float(sums[0] / sums[1].clamp(min=1))
