"""What the training loop (trainer.py) asks of a backend: the one place ``train.backend``
(megatron | deepspeed) makes a difference.

The loop owns everything the backends share: the model builder, data, the token count of the
global batch, the step/skip counters, metrics, validation batches, signals and when to save.
A backend owns the optimizer, the lr schedule, how gradients are formed, reduced, clipped and
applied, and its checkpoint format. Per step the loop calls, in this order::

    loss = backend.forward_backward(microbatches, global_tokens)  # grads of this step, reduced
    grad_norm, applied = backend.step(loss)                         # clip, schedule, update

``step`` must follow every ``forward_backward`` (DeepSpeed's engine counts microbatches and
updates at the last one, which it leaves to ``step``).

Implementations: :class:`~.megatron_backend.MegatronBackend` (megatron_backend.py),
:class:`~.deepspeed_backend.DeepSpeedBackend` (deepspeed_backend.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from .config import RunConfig
from .distributed import Layout
from .step import evaluate


class Backend(ABC):
    """Constructed by :func:`build_backend` after the model and before resuming: it builds its
    optimizer and schedule, and, when the run does not resume (``resume_from`` None), takes the
    initial weights named by ``checkpoint.init_from`` / ``checkpoint.load``."""

    name: str
    model: torch.nn.Module  # what runs the forward (the model, or a wrapper around it)
    eval_precision: str  # autocast precision of validation forwards

    def __init__(self, cfg: RunConfig, layout: Layout, model: torch.nn.Module, dpcp):
        self.cfg, self.layout, self.model, self.dpcp = cfg, layout, model, dpcp

    @abstractmethod
    def forward_backward(self, microbatches: list[dict], global_tokens: float) -> float:
        """Gradients of sum(per-token loss)/global_tokens over this rank's microbatches, summed
        over dp×cp (DESIGN.md §7); returns the token-weighted mean loss over dp×cp."""

    @abstractmethod
    def step(self, loss: float) -> tuple[float, bool]:
        """Clip, advance the schedule and update; returns (global grad norm, applied). A step
        with a non-finite loss or gradient is not applied (per the backend's rules) and leaves
        the schedule where it was."""

    @property
    @abstractmethod
    def lr(self) -> float:
        """The learning rate of the last update."""

    @abstractmethod
    def save(self, directory: str, *, step: int, extra: dict, meta: dict, keep_last: int) -> None:
        """Collective: a complete checkpoint ``directory/step_XXXXXXXX`` (checkpoint.save_step),
        ``extra`` per rank, ``meta`` from rank 0."""

    @abstractmethod
    def load(self, path: str, meta: dict) -> dict | None:
        """Resume weights, optimizer and schedule from ``path``; return this rank's ``extra``, or
        None when it was saved under another world size (the loop then reshards the loader)."""

    def evaluate(self, batches: list[dict]) -> float:
        return evaluate(self.model, batches, precision=self.eval_precision,
                        device=self.layout.device, loss_group=self.dpcp)


def build_backend(cfg: RunConfig, layout: Layout, model: torch.nn.Module, dpcp, *,
                  resume_from: tuple[str, dict] | None, log) -> Backend:
    if cfg.train.backend == "deepspeed":
        from .deepspeed_backend import DeepSpeedBackend as cls
    else:
        from .megatron_backend import MegatronBackend as cls
    return cls(cfg, layout, model, dpcp, resume_from=resume_from, log=log)
