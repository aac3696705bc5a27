"""Measure one training configuration's peak GPU memory and compare it with the estimate.

    torchrun --standalone --nproc-per-node N benchmarks/longctx_memory.py \\
        --model configs/mdn_1.3b.yaml --seq-len 131072 --tp 1 --cp 4 [--recompute] [--steps 2] \\
        [--loss-chunk-tokens 4096] [--json out.json]

Runs the real trainer (trainer.train: the model, bf16 autocast, AdamW, CP, recompute) for
--steps optimizer steps of micro_batch 1 on random tokens (one document per sequence), then
reports per rank torch.cuda.max_memory_allocated and the estimate of mdn_scale/train/memory.py
('allocated': the same quantity, and its three moments), as one JSON object (printed, and
written to --json) with the card, versions, date and command. A CUDA out-of-memory error is
reported as {"oom": true} with exit code 0, so that a search can go on.

One GPU standing in for one rank of a CP run (when no machine with that many GPUs is at hand):

    torchrun --standalone --nproc-per-node 1 benchmarks/longctx_memory.py \
        --model configs/mdn_1.3b.yaml --seq-len 1048576 --emulate-cp 4 --recompute ...

trains seq_len / R tokens on the one GPU with MDN_CP_EMULATE=1: every layer takes the CP code
paths with a group of one rank (the eager conv with its halo, the CP op with the lean node and
segments as MDN_CP_LEAN* say), so it keeps what a rank of CP = R keeps, except the optimizer's
share (this rank holds all of it, where ZeRO-1 over R ranks holds 1/R) and the R-sized map
buffers (an all-gather of one map instead of R; the estimate's (2R − 2) · H · (2K)² · 4 bytes at
most). 'estimate_allocated_gib' is the estimate of this run (the CP = R layout, the optimizer
unsharded), 'rank_estimate_allocated_gib' that of a real CP = R rank (--distributed-optimizer as
given), and 'projected_rank_peak_gib' the measured peak less the optimizer bytes the real rank
does not hold.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class RandomTokens:
    """The loader contract (iterable of micro-batches, state_dict/load_state_dict) on random tokens."""

    def __init__(self, seq_len: int, vocab: int, seed: int):
        self.T, self.vocab, self.seed, self.n = seq_len, vocab, seed, 0

    def __iter__(self):
        import torch

        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.n)
            self.n += 1
            s = torch.randint(0, self.vocab, (1, self.T + 1), generator=g)
            yield {"tokens": s[:, :-1].contiguous(), "labels": s[:, 1:].contiguous(),
                   "loss_mask": torch.ones(1, self.T), "cu_seqlens": torch.tensor([0, self.T], dtype=torch.int32)}

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, s):
        self.n = s["n"]


def _version(dist_name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist_name)
    except PackageNotFoundError:
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a YAML with a model: section")
    ap.add_argument("--seq-len", type=int, required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--cp", type=int, default=1)
    ap.add_argument("--recompute", action="store_true")
    ap.add_argument("--offload", action="store_true",
                    help="train.recompute_offload: the layers' kept inputs in host memory")
    ap.add_argument("--distributed-optimizer", action="store_true", help="ZeRO-1 over dp×cp")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--reserve-gib", type=float, default=3.0)
    ap.add_argument("--loss-chunk-tokens", type=int, default=None,
                    help="model.loss_chunk_tokens (default: the model config's; 0 = Megatron's loss)")
    ap.add_argument("--emulate-cp", type=int, default=None, metavar="R",
                    help="one process standing in for one rank of CP = R at --seq-len (module "
                         "docstring): trains seq_len / R tokens with MDN_CP_EMULATE=1")
    ap.add_argument("--json")
    ap.add_argument("--peak-breakdown", action="store_true",
                    help="record the CUDA allocator's history (Python stacks) from the model's "
                         "build on and add to the JSON what was live at the allocated-bytes peak, "
                         "by allocation site (tools/profiling.py peak_breakdown; rank 0)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run the same logic on CPU in fp32 (no memory figures): checks the script")
    a = ap.parse_args(argv)
    precision = "fp32" if a.cpu_smoke else "bf16"

    import torch
    import torch.distributed as dist
    import yaml

    from mdn_scale.model import ModelConfig
    from mdn_scale.train import trainer
    from mdn_scale.train.batches import StepBatches
    from mdn_scale.train.config import load_config, validate
    from mdn_scale.train.distributed import init_distributed, shutdown, world_size_from_env
    from mdn_scale.train.memory import GIB, Layout, estimate

    with open(a.model) as f:
        model_section = (yaml.safe_load(f) or {})["model"]
    world = world_size_from_env()
    R = a.emulate_cp
    if R is not None:
        if R < 2 or world != 1 or a.tp != 1 or a.cp != 1:
            ap.error(f"--emulate-cp R needs R >= 2 and one process with --tp 1 --cp 1 "
                     f"(got R = {R}, {world} processes, tp {a.tp}, cp {a.cp})")
        if a.seq_len % R:
            ap.error(f"--seq-len {a.seq_len} is not divisible by --emulate-cp {R}")
        os.environ["MDN_CP_EMULATE"] = "1"   # read by every MDN layer (mdn_scale.model.mixer)
    run_len = a.seq_len // R if R else a.seq_len   # the tokens this process trains on
    dp = world // (a.tp * a.cp)
    log_dir = tempfile.mkdtemp(prefix="longctx_mem_")
    overrides = [f"{k}={json.dumps(v)}" for k, v in {
        "parallel.tensor": a.tp, "parallel.context": a.cp, "train.seq_len": run_len,
        "train.micro_batch": 1, "train.global_batch": dp, "train.steps": a.steps,
        "train.precision": precision, "train.recompute": a.recompute, "train.warmup_steps": 1,
        "train.recompute_offload": a.offload,
        "parallel.distributed_optimizer": a.distributed_optimizer,
        "logging.dir": log_dir, "logging.tensorboard": False, "checkpoint.interval": 0,
        "eval.interval": 0}.items()]
    if a.loss_chunk_tokens is not None:
        model_section = dict(model_section, loss_chunk_tokens=a.loss_chunk_tokens)
    overrides += [f"model.{k}={json.dumps(v)}" for k, v in model_section.items()]
    overrides.append(f"model.seq_len={max(run_len, int(model_section.get('seq_len', 0)))}")
    cfg = load_config(None, overrides, foreign={"model": ModelConfig, "data": dict})
    validate(cfg, world, has_cuda=not a.cpu_smoke)
    layout = init_distributed(tensor=a.tp, pipeline=1, context=a.cp)

    class Batches(StepBatches):
        def __init__(self, cfg, layout):
            mk = lambda: RandomTokens(run_len, cfg.model.vocab_size, 1 + layout.dp_rank)  # noqa: E731
            super().__init__(cfg, layout, loader=mk(), valid_loader_factory=mk)

    trainer.StepBatches = Batches
    lay = Layout(tp=a.tp, cp=R or a.cp, dp=dp, seq_len=a.seq_len, precision=precision,
                 recompute=a.recompute, recompute_offload=a.offload,
                 distributed_optimizer=a.distributed_optimizer)
    rank_est = estimate(cfg.model, lay, reserve_gib=a.reserve_gib)
    # an emulating process holds the whole optimizer state
    est = estimate(cfg.model, replace(lay, distributed_optimizer=False), reserve_gib=a.reserve_gib) if R else rank_est
    import datetime
    import platform

    import triton

    result = {"seq_len": a.seq_len, "tp": a.tp, "cp": a.cp, "dp": dp, "recompute": a.recompute,
              "recompute_offload": a.offload,
              "distributed_optimizer": a.distributed_optimizer,
              "loss_chunk_tokens": cfg.model.loss_chunk_tokens, "model": a.model,
              "norm_kernel": cfg.model.norm_kernel,
              "mlp_kernel": cfg.model.mlp_kernel,
              "gpus": world, "card": "cpu" if a.cpu_smoke else torch.cuda.get_device_name(),
              "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
              "megatron_core": _version("megatron-core"),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
              "env": {k: os.environ[k] for k in ("MDN_FUSED_LOCAL", "MDN_COMPILE", "MDN_LOWP_MM",
                                                 "MDN_CP_EMULATE", "MDN_CP_LEAN", "MDN_CP_LEAN_SEGMENT_TOKENS",
                                                 "PYTORCH_CUDA_ALLOC_CONF") if k in os.environ},
              "estimate_allocated_gib": est["allocated"] / GIB, "estimate_total_gib": est["total"] / GIB,
              "estimate_peak_at": est["peak_at"],
              "estimate_moments_gib": {k: v / GIB for k, v in est["moments"].items()}}
    if R:
        result.update(emulate_cp=R, tokens_per_rank=run_len,
                      rank_estimate_allocated_gib=rank_est["allocated"] / GIB,
                      rank_estimate_total_gib=rank_est["total"] / GIB)
    if a.peak_breakdown and not a.cpu_smoke:
        # stacks at allocation only: with free stacks too ("all"), a Megatron autograd Function
        # failed inside the recorder on the H100 (SystemError from Function.apply, plan j)
        torch.cuda.memory._record_memory_history(max_entries=5_000_000, context="alloc", stacks="python")
    oom = False
    t0 = time.time()
    try:
        summary = trainer.train(cfg, layout)
        result["loss"] = summary["loss"]
        # steps whose loss or grad norm was not finite (the trainer skips their update): a run
        # that fits in memory but skips steps did not train (session 5: CP runs with NaN grads)
        result["skipped_steps"] = summary["skipped_steps"]
    except torch.cuda.OutOfMemoryError as e:
        oom = True
        # how far it got: the allocator's message (what it tried to allocate, what was allocated
        # and reserved) and the peak reached before the failed allocation
        result.update(oom_message=str(e)[:400],
                      peak_before_oom_gib=torch.cuda.max_memory_allocated() / GIB)
        if world > 1:
            # The other ranks may be waiting in a collective this rank will never join: report
            # and leave with an error, so torchrun stops them all now instead of at a timeout.
            result.update(oom=True, rank=dist.get_rank(), seconds=time.time() - t0,
                          oom_message=str(e)[:300])
            print("LONGCTX_MEMORY " + json.dumps(result), flush=True)
            if a.json:
                with open(a.json, "w") as f:
                    json.dump(result, f, indent=1)
            os._exit(3)
    result["seconds"] = time.time() - t0
    flag = torch.tensor([1.0 if oom else 0.0], device=layout.device)
    peak = torch.tensor([0.0 if a.cpu_smoke else torch.cuda.max_memory_allocated() / GIB], device=layout.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    result["oom"] = bool(flag.item())
    if not a.cpu_smoke:
        reserved = torch.tensor([torch.cuda.max_memory_reserved() / GIB], device=layout.device)
        dist.all_reduce(reserved, op=dist.ReduceOp.MAX)
        result["measured_reserved_gib"] = float(reserved.item())
    if a.peak_breakdown and not a.cpu_smoke and layout.is_logger:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
        from profiling import peak_breakdown

        snap = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        bd = peak_breakdown(snap["device_traces"][torch.cuda.current_device()])
        bd["sites"] = [dict(s, gib=s["bytes"] / GIB) for s in bd["sites"]]
        result["peak_breakdown"] = bd
    if not result["oom"] and not a.cpu_smoke:
        result["measured_peak_gib"] = float(peak.item())
        result["error"] = (result["estimate_allocated_gib"] - result["measured_peak_gib"]) / result["measured_peak_gib"]
        if R:
            result["projected_rank_peak_gib"] = (result["measured_peak_gib"]
                                                 - (est["optimizer"] - rank_est["optimizer"]) / GIB)
    if layout.is_logger:
        print("LONGCTX_MEMORY " + json.dumps(result), flush=True)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(result, f, indent=1)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
