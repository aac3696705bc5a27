"""``train.backend: megatron`` (the default): the Megatron-built model trained by our own step
components, on any TP/PP/CP/DP layout and on CPU.

step.py runs the forward/backward (Megatron's 1F1B schedule under PP), grads.py reduces the
gradients over dp×cp, takes the global norm and clips, optimizer.py holds AdamW (ZeRO-1 sharded
over dp×cp with ``parallel.distributed_optimizer``) and Megatron's lr schedule, checkpoint.py
the DCP checkpoints that reload under any layout. A step whose loss or gradient norm is not
finite is skipped when ``train.skip_nonfinite``.
"""

from __future__ import annotations

import math

import torch

from . import checkpoint as ckpt
from . import wgrad
from .backend import Backend
from .grads import clip_, finalize_grads, global_grad_norm
from .init_from import initialize as initialize_from
from .optimizer import build_optimizer, build_scheduler
from .step import forward_backward


class MegatronBackend(Backend):
    name = "megatron"

    def __init__(self, cfg, layout, model, dpcp, *, resume_from, log):
        """``model``: the model, or the list of its pipeline chunks (interleaved schedule, as
        tools/bench_model.py builds it); gradients, norm and optimizer then span all chunks."""
        super().__init__(cfg, layout, model, dpcp)
        self.owner = torch.nn.ModuleList(model) if isinstance(model, (list, tuple)) else model
        if cfg.train.fuse_wgrad:
            wgrad.enable(self.owner)   # before the first forward: its hooks give main_grad
        self.eval_precision = cfg.train.precision  # bf16 autocast over fp32 parameters
        self.optimizer = build_optimizer(self.owner, cfg.train,
                                         distributed=cfg.parallel.distributed_optimizer, group=dpcp)
        self.scheduler = build_scheduler(self.optimizer, cfg.train)
        if resume_from is None and (cfg.checkpoint.init_from or cfg.checkpoint.load):
            # A new run from another run's (or an HF model's) weights, e.g. long-context continued
            # pretraining: step 0, fresh schedule and data; optimizer fresh or kept (init_from.py).
            initialize_from(cfg, model, self.optimizer, log=log)

    def forward_backward(self, microbatches, global_tokens):
        self.optimizer.zero_grad(set_to_none=False)
        loss = forward_backward(self.model, microbatches, global_tokens=global_tokens,
                                precision=self.cfg.train.precision, device=self.layout.device,
                                loss_group=self.dpcp)
        finalize_grads(self.owner)
        return loss

    def step(self, loss):
        grad_norm = global_grad_norm(self.owner)
        if self.cfg.train.skip_nonfinite and not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return grad_norm, False
        clip_(self.owner, self.cfg.train.grad_clip, grad_norm)
        self.scheduler.step(1)  # the lr of this update
        self.optimizer.step()
        return grad_norm, True

    @property
    def lr(self):
        return self.optimizer.param_groups[0]["lr"]

    def save(self, directory, *, step, extra, meta, keep_last):
        ckpt.save(directory, step=step, model=self.model, optimizer=self.optimizer,
                  scheduler=self.scheduler, extra=extra, meta=meta, keep_last=keep_last)

    def load(self, path, meta):
        return ckpt.load(path, meta, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler)
