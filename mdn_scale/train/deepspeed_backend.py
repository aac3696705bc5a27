"""``train.backend: deepspeed``: a DeepSpeed engine (ZeRO 1/2/3, CPU offload, bf16) around the
model the Megatron backend trains, with TP = PP = 1.

What stays the trainer's: the model builder and its CPU-drawn init, the data (StepBatches, CP
slices), the loss (masked per-token sum / tokens of the global batch, DESIGN.md §7), AdamW with
the no-decay groups (optimizer.py, handed to DeepSpeed as the client optimizer), Megatron's lr
schedule, metrics.jsonl / TensorBoard, validation, signals. What DeepSpeed does: parameter,
gradient and optimizer-state partitioning, gradient reduction, clipping, offload, bf16 master
weights, and its checkpoint files.

Gradient reduction over dp×cp: DeepSpeed's data-parallel group is whatever ``mpu`` says
(``deepspeed.initialize(mpu=...)``); :class:`DataParallelOverDpCp` answers with Megatron's dp×cp
group, so ZeRO partitions and reduces over every rank that holds the same parameters (the CP
ranks of one replica hold the same parameters and different tokens). DeepSpeed *averages* over
that group; our per-rank loss is already divided by the global token count, so the loss handed
to ``engine.backward`` is multiplied by the group size (exact when it is a power of two; one
rounding otherwise) and the averaged gradient is the sum the Megatron backend forms.

Checkpoints (``checkpoint.dir``): ``step_XXXXXXXX/`` holds DeepSpeed's own files (written by
``engine.save_checkpoint``; the ZeRO partitions of this world size) plus our ``extra/rank_N.pt``
(RNG, loader position) and ``meta.json`` (step, tokens, schedule, ``"format": "deepspeed"``),
saved to ``.tmp`` and renamed when complete, exactly as checkpoint.py does. Resume needs the same
world size (ZeRO partitions); tools/convert_deepspeed_checkpoint.py turns one into full weights,
our DCP format or the HF layout. DeepSpeed's resume reads its files with pickle (``torch.load(
weights_only=False)`` in DeepSpeed 0.19): resume only from checkpoints your own runs wrote.
``checkpoint.load`` (weights only, from a DeepSpeed checkpoint of any stage and world size, or
from our DCP format) and the converter read them with ``weights_only=True``
(deepspeed_checkpoint.py).

Precision: ``train.precision=bf16`` is DeepSpeed's bf16 mode (bf16 parameters in the forward and
backward, fp32 master weights and moments), not the Megatron backend's autocast over fp32
parameters. Non-finite steps: DeepSpeed skips an update whose gradient norm is not finite (in
fp32 always, whatever ``train.skip_nonfinite`` says; in bf16 when ``train.skip_nonfinite``, its
``bf16.check_grad_overflow``); the step is counted as skipped and its lr taken back.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .config import RunConfig, save_resolved
from .distributed import Layout, seed_everything
from .metrics import MetricsLogger, model_flops_per_token, peak_flops
from .optimizer import build_optimizer, build_scheduler, param_groups
from .step import count_tokens, evaluate, to_model_inputs

FORMAT = "deepspeed"


class DataParallelOverDpCp:
    """The ``mpu`` DeepSpeed asks for its groups: data parallel = Megatron's dp×cp group, model
    parallel = the (size 1) tensor-parallel group."""

    def __init__(self):
        from megatron.core import parallel_state as ps

        self._ps = ps
        self._dp = ps.get_data_parallel_group(with_context_parallel=True)

    def get_data_parallel_group(self):
        return self._dp

    def get_data_parallel_world_size(self):
        return dist.get_world_size(self._dp)

    def get_data_parallel_rank(self):
        return dist.get_rank(self._dp)

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(self._dp)

    def get_model_parallel_group(self):
        return self._ps.get_tensor_model_parallel_group()

    def get_model_parallel_world_size(self):
        return self._ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_rank(self):
        return self._ps.get_tensor_model_parallel_rank()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank


def deepspeed_config(cfg: RunConfig, layout: Layout) -> dict:
    """The DeepSpeed JSON config for this run (micro/accumulation sizes in DeepSpeed's terms:
    its data-parallel world is dp×cp, and every rank runs ``micro_per_step`` microbatches)."""
    t, ds = cfg.train, cfg.deepspeed
    micro_per_step = t.global_batch // (t.micro_batch * layout.dp)
    zero = {"stage": ds.zero_stage, "reduce_bucket_size": ds.reduce_bucket_size,
            "allgather_bucket_size": ds.reduce_bucket_size, "overlap_comm": ds.overlap_comm,
            "contiguous_gradients": True}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": layout.device.type == "cuda"}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": layout.device.type == "cuda"}
    if ds.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
                    stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold)
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": micro_per_step,
        "train_batch_size": t.micro_batch * micro_per_step * layout.dp * layout.cp,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        # a non-finite gradient norm skips the update (fp32: always; bf16: when asked)
        "bf16": {"enabled": t.precision == "bf16", "check_grad_overflow": t.skip_nonfinite},
        # The client optimizer is torch AdamW (optimizer.py): the same update as the Megatron
        # backend. With offload DeepSpeed would prefer its CPUAdam (a compiled op); allow ours.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def build_engine(cfg: RunConfig, layout: Layout, model: torch.nn.Module):
    """(engine, scheduler): the DeepSpeed engine around ``model`` and Megatron's lr schedule on
    the engine's optimizer groups (ZeRO keeps the client optimizer's groups and their keys)."""
    if layout.device.type == "cpu":  # DeepSpeed picks CUDA unless told (CPU demo, CI)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    t = cfg.train
    if cfg.deepspeed.cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(param_groups(model), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                     eps=t.adam_eps, weight_decay=t.weight_decay, adamw_mode=True)
    else:
        optimizer = build_optimizer(model, t)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, layout),
        mpu=DataParallelOverDpCp(), dist_init_required=False)
    scheduler = build_scheduler(engine.optimizer, cfg.train)
    return engine, scheduler


def forward_backward(engine, microbatches: list[dict], *, global_tokens: float,
                     device: torch.device, loss_group) -> float:
    """The Megatron backend's step.forward_backward through the engine: gradients of
    sum(loss)/global_tokens, summed (not averaged) over dp×cp; returns the token-weighted mean
    loss over the group. The engine steps at the last microbatch (its accumulation boundary)."""
    denom = max(global_tokens, 1.0)
    group_size = dist.get_world_size(loss_group) if loss_group is not None else 1
    total = torch.zeros((), dtype=torch.float64, device=device)
    for mb in microbatches:
        inputs = to_model_inputs(mb, device)
        per_token = engine(inputs["tokens"], None, None, labels=inputs["labels"],
                           packed_seq_params=inputs["packed_seq_params"])
        loss_sum = (per_token.float() * inputs["loss_mask"]).sum()
        # ×group_size: DeepSpeed divides the reduced gradient by its data-parallel size
        engine.backward(loss_sum * (group_size / denom), scale_wrt_gas=False)
        # every microbatch: DeepSpeed counts micro steps here and, at the boundary (the last
        # one), reduces (ZeRO 1), takes the norm, clips and updates; non-finite gradients skip
        engine.step()
        total += loss_sum.detach().double()
    if group_size > 1:
        dist.all_reduce(total, group=loss_group)
    return float(total.item()) / denom


# ---------------------------------------------------------------- checkpoints

def save(engine, directory: str, *, step: int, scheduler, extra: dict, meta: dict,
         keep_last: int) -> str:
    """Collective. DeepSpeed's files plus ours in ``step_XXXXXXXX.tmp``, renamed when complete."""
    rank = dist.get_rank()
    name = ckpt.step_dir_name(step)
    final, tmp = os.path.join(directory, name), os.path.join(directory, name + ".tmp")
    if rank == 0:
        os.makedirs(directory, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, "extra"))
    dist.barrier()
    engine.save_checkpoint(directory, tag=name + ".tmp", save_latest=False)
    torch.save(extra, os.path.join(tmp, "extra", f"rank_{rank:05d}.pt"))
    dist.barrier()
    if rank == 0:
        files = {}
        for root, _, names in os.walk(tmp):
            for n in names:
                full = os.path.join(root, n)
                files[os.path.relpath(full, tmp)] = os.path.getsize(full)
        record = dict(meta, step=step, format=FORMAT, zero_stage=engine.zero_optimization_stage(),
                      scheduler=scheduler.state_dict(), files=files,
                      world_size=dist.get_world_size(), saved_at=time.time())
        ckpt._write_atomic(os.path.join(tmp, ckpt.META), json.dumps(record, indent=1))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        ckpt._write_atomic(os.path.join(directory, ckpt.LATEST), name + "\n")
        ckpt._prune(directory, keep_last)
    dist.barrier()
    return final


def check_resumable(path: str, meta: dict) -> None:
    """Before any engine is built: a checkpoint this backend can resume (its own format, this
    world size), or an error that says what to do instead."""
    if meta.get("format") != FORMAT:
        raise ckpt.CheckpointError(
            f"{path} is a checkpoint of the Megatron backend, not a DeepSpeed one: resume it with "
            "train.backend=megatron, or start from its weights with checkpoint.load")
    world = dist.get_world_size()
    if meta.get("world_size") != world:
        raise ckpt.CheckpointError(
            f"{path} was saved by {meta.get('world_size')} ranks, this run has {world}: ZeRO "
            "partitions resume only on the same world size. Start from its weights with "
            "checkpoint.load, or convert it (tools/convert_deepspeed_checkpoint.py to-ours) and "
            "resume under train.backend=megatron at any layout")


def load(engine, path: str, meta: dict, *, scheduler) -> dict:
    """Resume ``engine`` (weights, ZeRO optimizer partitions) and the schedule from a checkpoint
    of this backend; return this rank's extra (RNG, loader position)."""
    check_resumable(path, meta)
    directory, tag = os.path.split(os.path.normpath(path))
    loaded, _ = engine.load_checkpoint(directory, tag=tag, load_optimizer_states=True,
                                       load_lr_scheduler_states=False)
    if loaded is None:
        raise ckpt.CheckpointError(f"{path}: DeepSpeed could not load it")
    scheduler.load_state_dict(meta["scheduler"])
    return torch.load(os.path.join(path, "extra", f"rank_{dist.get_rank():05d}.pt"), weights_only=True)


def load_initial_weights(model, path: str, meta: dict) -> None:
    """``checkpoint.load``: weights only, from our DCP format (either backend's, any layout) or
    a DeepSpeed checkpoint (any ZeRO stage and world size), into the model before wrapping."""
    if meta.get("format") == FORMAT:
        from .deepspeed_checkpoint import load_weights_into, read_zero_checkpoint

        weights, _, _, _ = read_zero_checkpoint(path, moments=False)
        load_weights_into(model, weights, path)
    else:
        ckpt.load(path, meta, model=model)


# ---------------------------------------------------------------- the loop

def train(cfg: RunConfig, layout: Layout) -> dict:
    """trainer.train for ``train.backend: deepspeed`` (same summary, logs and checkpoints dir)."""
    from megatron.core import parallel_state as ps

    # StepBatches through trainer's namespace: one data component for both backends
    from .trainer import StepBatches, StopFlag, build_model

    t = cfg.train
    log_rank0 = (lambda *a: print(*a, flush=True)) if layout.is_logger else (lambda *a: None)
    seed_everything(cfg.seed, layout)
    model = build_model(cfg, layout)
    data = StepBatches(cfg, layout)
    dpcp = ps.get_data_parallel_group(with_context_parallel=True)

    found = ckpt.find_loadable(cfg.checkpoint.dir, log=log_rank0) if cfg.checkpoint.dir else None
    if found is not None:
        check_resumable(*found)
    elif cfg.checkpoint.load:
        init = ckpt.find_loadable(cfg.checkpoint.load, log=log_rank0)
        if init is None:
            raise ckpt.CheckpointError(f"checkpoint.load: no complete checkpoint in {cfg.checkpoint.load}")
        load_initial_weights(model, *init)
        log_rank0(f"[checkpoint] initialised the weights from {init[0]}")
    engine, scheduler = build_engine(cfg, layout, model)

    step, consumed_tokens, skipped = 0, 0, 0
    if found is not None:
        path, meta = found
        extra = load(engine, path, meta, scheduler=scheduler)
        step, consumed_tokens, skipped = meta["step"], meta["consumed_tokens"], meta["skipped_steps"]
        ckpt.set_rng_state(extra["rng"])
        data.load_state_dict(extra["data"])
        log_rank0(f"[checkpoint] resumed from {path} at step {step}")

    if layout.is_logger:
        save_resolved(cfg, cfg.logging.dir)
    logger = MetricsLogger(cfg.logging.dir, enabled=layout.is_logger,
                           tensorboard=cfg.logging.tensorboard, total_steps=t.steps, resume_step=step)
    flops_per_token = model_flops_per_token(cfg.model, t.seq_len)
    peak = peak_flops(layout.device)
    tokens_per_step = t.global_batch * t.seq_len
    stop = StopFlag()
    engine.train()
    last_loss, stopped = float("nan"), False

    def save_now(at_step):
        save(engine, cfg.checkpoint.dir, step=at_step, scheduler=scheduler,
             keep_last=cfg.checkpoint.keep_last,
             extra={"rng": ckpt.rng_state(), "data": data.state_dict()},
             meta={"consumed_tokens": consumed_tokens, "skipped_steps": skipped,
                   "data": data.state_dict(), "layout": layout.as_dict()})
        log_rank0(f"[checkpoint] saved step {at_step} to {cfg.checkpoint.dir}")

    try:
        window_start, window_tokens = time.time(), 0
        while step < t.steps:
            microbatches = data.next_step()
            global_tokens = count_tokens(microbatches, dpcp, layout.device)
            scheduler.step(1)  # the lr of this update (taken back below if DeepSpeed skips it)
            loss = forward_backward(engine, microbatches, global_tokens=global_tokens,
                                    device=layout.device, loss_group=dpcp)
            grad_norm = engine.get_global_grad_norm()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            if not engine.was_step_applied():
                scheduler.step(-1)
                skipped += 1
                log_rank0(f"step {step + 1}: non-finite loss {loss} / grad norm {grad_norm}: "
                          f"update skipped by DeepSpeed ({skipped} so far)")
            step += 1
            consumed_tokens += tokens_per_step
            window_tokens += tokens_per_step
            last_loss = loss

            if step % cfg.logging.interval == 0 or step == t.steps:
                elapsed = max(time.time() - window_start, 1e-9)
                tps = window_tokens / elapsed
                record = {"loss": loss, "lr": engine.optimizer.param_groups[0]["lr"],
                          "grad_norm": grad_norm, "tokens": consumed_tokens,
                          "tokens_per_s": tps, "skipped_steps": skipped,
                          "step_time_s": elapsed * tokens_per_step / window_tokens}
                if peak:
                    record["mfu"] = tps * flops_per_token / (peak * layout.world)
                if layout.device.type == "cuda":
                    record["memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
                else:  # peak resident memory of this process (Linux reports KiB), as trainer.py
                    import resource

                    record["memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                logger.log(step, record)
                window_start, window_tokens = time.time(), 0

            if cfg.eval.interval and (step % cfg.eval.interval == 0 or step == t.steps):
                val = evaluate(engine, data.validation_batches(cfg.eval.batches),
                               precision="fp32", device=layout.device, loss_group=dpcp)
                logger.log(step, {"val_loss": val, "val_ppl": math.exp(min(val, 50))})

            stopped = stop.agreed(layout.device)
            saving = bool(cfg.checkpoint.dir) and cfg.checkpoint.interval > 0
            if saving and (step % cfg.checkpoint.interval == 0 or step == t.steps or stopped):
                save_now(step)
            if stopped:
                log_rank0(f"stopping at step {step} on signal {stop.signum or '(another rank)'}")
                break
    finally:
        stop.restore()
        logger.close()
        data.close()
    return {"step": step, "loss": last_loss, "stopped": stopped, "skipped_steps": skipped}
