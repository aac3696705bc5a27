"""The training loop: build, resume, step, log, evaluate, checkpoint — one screen of code.

Components live in their own files: config (schema, validation), distributed (process groups),
batches (data for one step), step (forward/backward), grads (dp×cp reduction, norm, clipping),
optimizer (AdamW, schedule), checkpoint (DCP, atomic, resharding), metrics (logging).
"""

from __future__ import annotations

import math
import signal
import time

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .batches import StepBatches
from .config import RunConfig, save_resolved
from .distributed import Layout, seed_everything
from .init_from import initialize as initialize_from
from .grads import clip_, finalize_grads, global_grad_norm
from .metrics import MetricsLogger, model_flops_per_token, peak_flops
from .optimizer import build_optimizer, build_scheduler
from .recompute import enable_layer_recompute
from .step import count_tokens, evaluate, forward_backward


class StopFlag:
    """Set by SIGTERM / SIGUSR1 (cluster preemption, `scancel --signal`): save, then exit."""

    def __init__(self):
        self.signum = None
        self._previous = {}
        for s in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum

    def agreed(self, device) -> bool:
        """True on every rank once any rank got a signal (ranks see it at different times)."""
        flag = torch.tensor([1.0 if self.signum is not None else 0.0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self):
        for s, h in self._previous.items():
            signal.signal(s, h)


def build_model(cfg: RunConfig, layout: Layout):
    from megatron.core import parallel_state as ps

    from mdn_scale.model import build_model as build

    # Weights drawn whole on the CPU and split: the same initial model under every layout
    # (Megatron's GPU init draws per rank).
    overrides = {"use_cpu_initialization": True}
    if cfg.parallel.sequence_parallel:
        overrides["sequence_parallel"] = True
    model = build(cfg.model, pre_process=ps.is_pipeline_first_stage(),
                  post_process=ps.is_pipeline_last_stage(), **overrides)
    if cfg.train.recompute:
        enable_layer_recompute(model)
    return model.to(layout.device)


def train(cfg: RunConfig, layout: Layout) -> dict:
    """Run (or resume) training; returns a summary (final step, last loss, stopped by signal)."""
    if cfg.train.backend == "deepspeed":  # the same loop around a DeepSpeed engine
        from .deepspeed_backend import train as train_deepspeed

        return train_deepspeed(cfg, layout)
    t = cfg.train
    log_rank0 = (lambda *a: print(*a, flush=True)) if layout.is_logger else (lambda *a: None)
    seed_everything(cfg.seed, layout)
    model = build_model(cfg, layout)
    dpcp = _dp_cp_group()
    optimizer = build_optimizer(model, t, distributed=cfg.parallel.distributed_optimizer, group=dpcp)
    scheduler = build_scheduler(optimizer, t)
    data = StepBatches(cfg, layout)

    step, consumed_tokens, skipped = 0, 0, 0
    found = ckpt.find_loadable(cfg.checkpoint.dir, log=log_rank0) if cfg.checkpoint.dir else None
    if found is None and (cfg.checkpoint.init_from or cfg.checkpoint.load):
        # A new run from another run's (or an HF model's) weights, e.g. long-context continued
        # pretraining: step 0, fresh schedule and data; optimizer fresh or kept (init_from.py).
        initialize_from(cfg, model, optimizer, log=log_rank0)
    if found is not None:
        path, meta = found
        extra = ckpt.load(path, meta, model=model, optimizer=optimizer, scheduler=scheduler)
        step, consumed_tokens, skipped = meta["step"], meta["consumed_tokens"], meta["skipped_steps"]
        if extra is not None:  # same world: exact per-rank RNG and loader position
            ckpt.set_rng_state(extra["rng"])
            data.load_state_dict(extra["data"])
        else:  # another layout: the loader position of data-parallel rank 0 → every rank
            data.load_state_dict(meta["data"], resharded=True)
        log_rank0(f"[checkpoint] resumed from {path} at step {step}")

    if layout.is_logger:
        save_resolved(cfg, cfg.logging.dir)
    logger = MetricsLogger(cfg.logging.dir, enabled=layout.is_logger,
                           tensorboard=cfg.logging.tensorboard, total_steps=t.steps, resume_step=step)
    flops_per_token = model_flops_per_token(cfg.model, t.seq_len)
    peak = peak_flops(layout.device)
    tokens_per_step = t.global_batch * t.seq_len
    stop = StopFlag()
    model.train()
    last_loss, stopped = float("nan"), False

    def save(at_step):
        ckpt.save(cfg.checkpoint.dir, step=at_step, model=model, optimizer=optimizer,
                  scheduler=scheduler, keep_last=cfg.checkpoint.keep_last,
                  extra={"rng": ckpt.rng_state(), "data": data.state_dict()},
                  meta={"consumed_tokens": consumed_tokens, "skipped_steps": skipped,
                        "data": data.state_dict(), "layout": layout.as_dict()})
        log_rank0(f"[checkpoint] saved step {at_step} to {cfg.checkpoint.dir}")

    try:
        window_start, window_tokens = time.time(), 0
        while step < t.steps:
            microbatches = data.next_step()
            loss, grad_norm, applied = train_step(model, optimizer, scheduler, microbatches, t=t,
                                                  device=layout.device, dpcp=dpcp)
            if not applied:
                skipped += 1
                log_rank0(f"step {step + 1}: non-finite loss {loss} / grad norm {grad_norm}: "
                          f"update skipped ({skipped} so far)")
            step += 1
            consumed_tokens += tokens_per_step
            window_tokens += tokens_per_step
            last_loss = loss

            if step % cfg.logging.interval == 0 or step == t.steps:
                elapsed = max(time.time() - window_start, 1e-9)
                tps = window_tokens / elapsed
                record = {"loss": loss, "lr": optimizer.param_groups[0]["lr"],
                          "grad_norm": grad_norm, "tokens": consumed_tokens,
                          "tokens_per_s": tps, "skipped_steps": skipped,
                          "step_time_s": elapsed * tokens_per_step / window_tokens}
                if peak:
                    record["mfu"] = tps * flops_per_token / (peak * layout.world)
                if layout.device.type == "cuda":
                    record["memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
                else:  # peak resident memory of this process (Linux reports KiB)
                    import resource

                    record["memory_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
                logger.log(step, record)
                window_start, window_tokens = time.time(), 0

            if cfg.eval.interval and (step % cfg.eval.interval == 0 or step == t.steps):
                val = evaluate(model, data.validation_batches(cfg.eval.batches),
                               precision=t.precision, device=layout.device, loss_group=dpcp)
                logger.log(step, {"val_loss": val, "val_ppl": math.exp(min(val, 50))})

            stopped = stop.agreed(layout.device)
            # DESIGN §8: every `interval` steps and at the end; interval 0 = never save
            saving = bool(cfg.checkpoint.dir) and cfg.checkpoint.interval > 0
            if saving and (step % cfg.checkpoint.interval == 0 or step == t.steps or stopped):
                save(step)
            if stopped:
                log_rank0(f"stopping at step {step} on signal {stop.signum or '(another rank)'}")
                break
    finally:
        stop.restore()
        logger.close()
        data.close()
    return {"step": step, "loss": last_loss, "stopped": stopped, "skipped_steps": skipped}


def train_step(model, optimizer, scheduler, microbatches: list[dict], *, t, device, dpcp):
    """One optimizer step on this rank's (CP-sliced) microbatches: forward/backward, gradient
    reduction over dp×cp, global norm, clipping, lr schedule and update (tools/bench_model.py
    times exactly this). ``model``: a module, or a list of pipeline model chunks (interleaved
    schedule). Returns (loss, grad_norm, applied); a step with a non-finite loss or norm is not
    applied when ``t.skip_nonfinite``."""
    owner = torch.nn.ModuleList(model) if isinstance(model, (list, tuple)) else model
    global_tokens = count_tokens(microbatches, dpcp, device)
    optimizer.zero_grad(set_to_none=False)
    loss = forward_backward(model, microbatches, global_tokens=global_tokens,
                            precision=t.precision, device=device, loss_group=dpcp)
    finalize_grads(owner)
    grad_norm = global_grad_norm(owner)
    if t.skip_nonfinite and not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return loss, grad_norm, False
    clip_(owner, t.grad_clip, grad_norm)
    scheduler.step(1)  # the lr of this update
    optimizer.step()
    return loss, grad_norm, True


def _dp_cp_group():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group(with_context_parallel=True)
