"""The training loop: build, resume, step, log, evaluate, checkpoint — one screen of code, the
same for both backends (``train.backend``).

Components live in their own files: config (schema, validation), distributed (process groups),
batches (data for one step), backend (what the loop asks of a backend: forward/backward, step,
lr, checkpoint save/load) with megatron_backend (step: forward/backward, grads: dp×cp
reduction, norm, clipping, optimizer: AdamW, schedule, checkpoint: DCP, atomic, resharding) and
deepspeed_backend (a DeepSpeed engine), metrics (logging).
"""

from __future__ import annotations

import math
import signal
import time

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .backend import build_backend
from .batches import StepBatches
from .config import RunConfig, apply_op_settings, save_resolved
from .distributed import Layout, seed_everything
from .metrics import MetricsLogger, memory_stats, model_flops_per_token, peak_flops
from .recompute import enable_layer_recompute
from .step import count_tokens


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
        enable_layer_recompute(model, offload=cfg.train.recompute_offload,
                               keep_cp_maps=cfg.train.recompute_keep_cp_maps)
    apply_op_settings(cfg)   # the op reads its settings (CP node, backward segments) at each call
    return model.to(layout.device)


def train(cfg: RunConfig, layout: Layout) -> dict:
    """Run (or resume) training; returns a summary (final step, last loss, stopped by signal)."""
    t = cfg.train
    log_rank0 = (lambda *a: print(*a, flush=True)) if layout.is_logger else (lambda *a: None)
    seed_everything(cfg.seed, layout)
    model = build_model(cfg, layout)
    if t.cp_check and layout.cp > 1:
        _check_cp(cfg, layout, model, log_rank0)
    dpcp = _dp_cp_group()
    data = StepBatches(cfg, layout)
    found = ckpt.find_loadable(cfg.checkpoint.dir, log=log_rank0) if cfg.checkpoint.dir else None
    backend = build_backend(cfg, layout, model, dpcp, resume_from=found, log=log_rank0)

    step, consumed_tokens, skipped = 0, 0, 0
    if found is not None:
        path, meta = found
        extra = backend.load(path, meta)
        step, consumed_tokens, skipped = meta["step"], meta["consumed_tokens"], meta["skipped_steps"]
        if extra is not None:  # same world: exact per-rank RNG and loader position
            ckpt.set_rng_state(extra["rng"])
            data.load_state_dict(extra["data"])
        else:  # another layout: the loader position of data-parallel rank 0 → every rank
            data.load_state_dict(meta["data"], resharded=True)
        log_rank0(f"[checkpoint] resumed from {path} at step {step}")

    start_step = step   # where this process began (a resumed run: its checkpoint's step)
    if layout.is_logger:
        save_resolved(cfg, cfg.logging.dir)
    logger = MetricsLogger(cfg.logging.dir, enabled=layout.is_logger,
                           tensorboard=cfg.logging.tensorboard, total_steps=t.steps, resume_step=step)
    flops_per_token = model_flops_per_token(cfg.model, t.seq_len)
    peak = peak_flops(layout.device)
    tokens_per_step = t.global_batch * t.seq_len
    stop = StopFlag()
    backend.model.train()
    last_loss, stopped = float("nan"), False

    def save(at_step):
        backend.save(cfg.checkpoint.dir, step=at_step, keep_last=cfg.checkpoint.keep_last,
                     extra={"rng": ckpt.rng_state(), "data": data.state_dict()},
                     meta={"consumed_tokens": consumed_tokens, "skipped_steps": skipped,
                           "data": data.state_dict(), "layout": layout.as_dict()})
        log_rank0(f"[checkpoint] saved step {at_step} to {cfg.checkpoint.dir}")

    try:
        window_start, window_tokens = time.time(), 0
        while step < t.steps:
            microbatches = data.next_step()
            global_tokens = count_tokens(microbatches, dpcp, layout.device)
            loss = backend.forward_backward(microbatches, global_tokens)
            grad_norm, applied = backend.step(loss)
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
                record = {"loss": loss, "lr": backend.lr, "grad_norm": grad_norm,
                          "tokens": consumed_tokens, "tokens_per_s": tps, "skipped_steps": skipped,
                          "step_time_s": elapsed * tokens_per_step / window_tokens}
                if peak:
                    record["mfu"] = tps * flops_per_token / (peak * layout.world)
                record.update(memory_stats(layout.device))
                logger.log(step, record)
                window_start, window_tokens = time.time(), 0

            if cfg.eval.interval and (step % cfg.eval.interval == 0 or step == t.steps):
                val = backend.evaluate(data.validation_batches(cfg.eval.batches))
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
    return {"step": step, "loss": last_loss, "stopped": stopped, "skipped_steps": skipped,
            "start_step": start_step}


def _check_cp(cfg: RunConfig, layout: Layout, model, log) -> None:
    from .cp_check import check_run

    rep = check_run(cfg, layout, model)
    log(f"[cp-check] layer 0 under CP = {layout.cp} against one rank, {rep['tokens']} tokens: worst "
        f"relative gradient error {rep['world_worst_error']:.2e} (bound {rep['tolerance']:g})"
        + ("" if rep["world_worst_error"] >= 0 else " (no MDN layer 0: not checked)"))


def _dp_cp_group():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group(with_context_parallel=True)
