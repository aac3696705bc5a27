"""``train.backend: deepspeed``: a DeepSpeed engine (ZeRO 1/2/3, CPU offload, bf16) around the
model the Megatron backend trains, with TP = PP = 1, behind the loop's Backend interface
(backend.py; the loop is trainer.py's, the same for both backends).

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
saved to ``.tmp`` and renamed when complete (checkpoint.save_step, the frame of every save).
Resume needs the same world size (ZeRO partitions); tools/convert_deepspeed_checkpoint.py turns
one into full weights, our DCP format or the HF layout. DeepSpeed's resume reads its files with
pickle (``torch.load(weights_only=False)`` in DeepSpeed 0.19): resume only from checkpoints your
own runs wrote. ``checkpoint.load`` (weights only, from a DeepSpeed checkpoint of any stage and
world size, or from our DCP format) and the converter read them with ``weights_only=True``
(deepspeed_checkpoint.py).

Precision: ``train.precision=bf16`` is DeepSpeed's bf16 mode (bf16 parameters in the forward and
backward, fp32 master weights and moments), not the Megatron backend's autocast over fp32
parameters. Non-finite steps: DeepSpeed skips an update whose gradient norm is not finite (in
fp32 always, whatever ``train.skip_nonfinite`` says; in bf16 when ``train.skip_nonfinite``, its
``bf16.check_grad_overflow``); the step is counted as skipped and its lr taken back.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from . import checkpoint as ckpt
from .backend import Backend
from .config import RunConfig
from .distributed import Layout
from .optimizer import build_optimizer, build_scheduler, param_groups, use_fused
from .step import to_model_inputs

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


# DeepSpeed's ops that it compiles on first use (torch.utils.cpp_extension) in our runs: the CPU
# accelerator's shared-memory all-reduce (loaded by every deepspeed.initialize on CPU) and
# CPUAdam (deepspeed.cpu_adam).
SHM_COMM_OP, CPU_ADAM_OP = "deepspeed_shm_comm", "cpu_adam"
STALE_LOCK_S = 600.0  # a build takes about a minute on 2 cores


def clear_stale_build_locks(names, log=print, max_age_s: float = STALE_LOCK_S) -> list[str]:
    """Remove build locks of the JIT ops ``names`` older than ``max_age_s``; returns their paths.

    torch's extension loader takes a lock file (``<build dir>/lock``) around every load, also
    when the op is already built, and a later process waits on it with no timeout. A process
    killed in that window leaves the lock behind, and every later DeepSpeed run on this machine
    hangs in ``deepspeed.initialize`` without a word (it cost us a CI run). No build holds the
    lock for minutes, so an old one is stale: name it and remove it."""
    from torch.utils.cpp_extension import _get_build_directory

    removed = []
    for name in names:
        lock = os.path.join(_get_build_directory(name, verbose=False), "lock")
        try:
            age = time.time() - os.stat(lock).st_mtime
        except FileNotFoundError:
            continue
        if age < max_age_s:
            continue
        try:
            os.remove(lock)
        except FileNotFoundError:  # another rank of this node removed it first
            continue
        log(f"[deepspeed] removed a stale build lock {lock} ({age / 60:.0f} min old; left by a "
            "killed process, torch would wait on it forever)")
        removed.append(lock)
    return removed


def build_engine(cfg: RunConfig, layout: Layout, model: torch.nn.Module, log=print):
    """(engine, scheduler): the DeepSpeed engine around ``model`` and Megatron's lr schedule on
    the engine's optimizer groups (ZeRO keeps the client optimizer's groups and their keys)."""
    if layout.device.type == "cpu":  # DeepSpeed picks CUDA unless told (CPU demo, CI)
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # only the ops this run loads (looking a build directory up creates it)
    loads = {SHM_COMM_OP: layout.device.type == "cpu", CPU_ADAM_OP: cfg.deepspeed.cpu_adam}
    clear_stale_build_locks([name for name, used in loads.items() if used], log)
    import deepspeed

    t = cfg.train
    if cfg.deepspeed.cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(param_groups(model), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                     eps=t.adam_eps, weight_decay=t.weight_decay, adamw_mode=True)
    else:
        # The multi-tensor foreach path on CUDA, as before the Megatron backend moved to fused
        # AdamW: DeepSpeed steps the client optimizer on its own fp32 partitions (in CPU memory
        # with offload_optimizer), and fused AdamW is untested there.
        optimizer = build_optimizer(model, t, foreach=use_fused(model))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, layout),
        mpu=DataParallelOverDpCp(), dist_init_required=False)
    scheduler = build_scheduler(engine.optimizer, cfg.train)
    return engine, scheduler


class DeepSpeedBackend(Backend):
    name = "deepspeed"
    eval_precision = "fp32"  # bf16 is the engine's parameter dtype, not an autocast

    def __init__(self, cfg, layout, model, dpcp, *, resume_from, log):
        if resume_from is not None:
            check_resumable(*resume_from)  # before building an engine it could not resume
        elif cfg.checkpoint.load:
            init = ckpt.find_loadable(cfg.checkpoint.load, log=log)
            if init is None:
                raise ckpt.CheckpointError(f"checkpoint.load: no complete checkpoint in {cfg.checkpoint.load}")
            load_initial_weights(model, *init)
            log(f"[checkpoint] initialised the weights from {init[0]}")
        self.engine, self.scheduler = build_engine(cfg, layout, model, log)
        super().__init__(cfg, layout, self.engine, dpcp)

    def forward_backward(self, microbatches, global_tokens):
        """step.forward_backward through the engine: gradients of sum(loss)/global_tokens,
        summed (not averaged) over dp×cp. ``engine.step()`` follows every microbatch's backward
        (DeepSpeed counts micro steps there) except the last: that one, the accumulation
        boundary where DeepSpeed reduces, clips and updates, is :meth:`step`'s."""
        engine = self.engine
        denom = max(global_tokens, 1.0)
        group_size = dist.get_world_size(self.dpcp) if self.dpcp is not None else 1
        total = torch.zeros((), dtype=torch.float64, device=self.layout.device)
        for i, mb in enumerate(microbatches):
            inputs = to_model_inputs(mb, self.layout.device)
            per_token = engine(inputs["tokens"], None, None, labels=inputs["labels"],
                               packed_seq_params=inputs["packed_seq_params"])
            loss_sum = (per_token.float() * inputs["loss_mask"]).sum()
            # ×group_size: DeepSpeed divides the reduced gradient by its data-parallel size
            engine.backward(loss_sum * (group_size / denom), scale_wrt_gas=False)
            total += loss_sum.detach().double()
            if i < len(microbatches) - 1:
                engine.step()
        if group_size > 1:
            dist.all_reduce(total, group=self.dpcp)
        return float(total.item()) / denom

    def step(self, loss):
        self.scheduler.step(1)  # the lr of this update (taken back if DeepSpeed skips it)
        # the accumulation boundary: reduce (ZeRO 1), norm, clip, update; DeepSpeed skips an
        # update whose gradient norm is not finite
        self.engine.step()
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        if not self.engine.was_step_applied():
            self.scheduler.step(-1)
            return grad_norm, False
        return grad_norm, True

    @property
    def lr(self):
        return self.engine.optimizer.param_groups[0]["lr"]

    def save(self, directory, *, step, extra, meta, keep_last):
        """DeepSpeed's files plus ours, written and renamed as checkpoint.save_step does."""
        engine, scheduler = self.engine, self.scheduler

        def write(tmp):
            head, tag = os.path.split(tmp)
            engine.save_checkpoint(head, tag=tag, save_latest=False)
            return {"format": FORMAT, "zero_stage": engine.zero_optimization_stage(),
                    "scheduler": scheduler.state_dict()}

        ckpt.save_step(directory, step, write, extra=extra, meta=meta, keep_last=keep_last)

    def load(self, path, meta):
        """Resume the engine (weights, ZeRO optimizer partitions) and the schedule from a
        checkpoint of this backend; return this rank's extra (RNG, loader position)."""
        check_resumable(path, meta)
        directory, tag = os.path.split(os.path.normpath(path))
        loaded, _ = self.engine.load_checkpoint(directory, tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise ckpt.CheckpointError(f"{path}: DeepSpeed could not load it")
        self.scheduler.load_state_dict(meta["scheduler"])
        return ckpt.load_extra_of_rank(path, dist.get_rank())


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


def load_initial_weights(model, path: str, meta: dict) -> None:
    """``checkpoint.load``: weights only, from our DCP format (either backend's, any layout) or
    a DeepSpeed checkpoint (any ZeRO stage and world size), into the model before wrapping."""
    if meta.get("format") == FORMAT:
        from .deepspeed_checkpoint import load_weights_into, read_zero_checkpoint

        weights, _, _, _ = read_zero_checkpoint(path, moments=False)
        load_weights_into(model, weights, path)
    else:
        ckpt.load(path, meta, model=model)
