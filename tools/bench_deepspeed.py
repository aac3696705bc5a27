"""GPU memory and throughput of the 1.3B MDN (configs/mdn_1.3b.yaml): the DeepSpeed backend
(ZeRO 3 with CPU offload on 1 GPU, ZeRO 3 on 2 and 4 GPUs) against the Megatron backend on the
same GPU counts, in one session. Written on a machine without a GPU: not yet run.

    python tools/bench_deepspeed.py --out $OUT/deepspeed_1p3b.json            # every case that fits
    python tools/bench_deepspeed.py --out X.json --cases ds_z3_offload_1,megatron_1 --steps 6

Each case is one ``torchrun launch/pretrain.py`` of the 1.3B model on the demo shards (byte
tokens, built on first use; the token ids fit the GPT-2 vocabulary, and throughput does not
depend on the text), bf16, micro batch 1 × ``--seq-len`` tokens, ``--global-batch`` sequences
per step (so 1 GPU accumulates global_batch microbatches, 4 GPUs global_batch/4). Recorded per
case: tokens/s over all GPUs (median of the steps after ``--warmup``), step time, the torch peak
allocated memory of rank 0 (metrics.jsonl memory_gb), the peak nvidia-smi memory of every GPU
(allocator reserve and CUDA context included), the peak host memory used (what offload moves to
the CPU), losses, exit status and the command. The JSON (card, driver, versions, git commit,
date) is rewritten after every case, so a run cut short by the device's 10-minute limit keeps
what finished.

Precision differs by design between the backends: the Megatron backend runs bf16 autocast over
fp32 parameters, with its distributed optimizer (parallel.distributed_optimizer: fp32 AdamW
moments sharded over dp×cp, parameters and gradients replicated); the DeepSpeed backend keeps
bf16 parameters, and fp32 master weights and moments partitioned by ZeRO. Both are what a user
of each gets.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the Megatron backend with its distributed optimizer (ZeRO-1 over dp×cp; on 1 GPU the same as plain)
MEGATRON = ["train.backend=megatron", "parallel.distributed_optimizer=true"]
CASES = {  # name: (GPUs, overrides)
    "megatron_1": (1, MEGATRON),
    "ds_z3_offload_1": (1, ["train.backend=deepspeed", "deepspeed.zero_stage=3",
                            "deepspeed.offload_optimizer=true", "deepspeed.offload_param=true"]),
    "ds_z3_offload_cpuadam_1": (1, ["train.backend=deepspeed", "deepspeed.zero_stage=3",
                                    "deepspeed.offload_optimizer=true", "deepspeed.offload_param=true",
                                    "deepspeed.cpu_adam=true"]),
    "megatron_2": (2, MEGATRON),
    "ds_z3_2": (2, ["train.backend=deepspeed", "deepspeed.zero_stage=3"]),
    "megatron_4": (4, MEGATRON),
    "ds_z3_4": (4, ["train.backend=deepspeed", "deepspeed.zero_stage=3"]),
}
DEFAULT = ["megatron_1", "ds_z3_offload_1", "megatron_2", "ds_z3_2", "megatron_4", "ds_z3_4"]


def _run(cmd, **kw) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw).stdout.strip()
    except Exception as e:  # a missing tool is recorded, not fatal
        return f"unavailable ({e})"


def environment() -> dict:
    import torch

    versions = {"python": sys.version.split()[0], "torch": torch.__version__,
                "cuda": torch.version.cuda}
    for mod in ("deepspeed", "megatron.core", "triton"):
        try:
            versions[mod] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception as e:
            versions[mod] = f"not importable ({type(e).__name__})"
    return {
        "card": _run(["nvidia-smi", "--query-gpu=index,name,memory.total,driver_version",
                      "--format=csv,noheader"]).splitlines(),
        "gpus": torch.cuda.device_count(),
        "cpus": os.cpu_count(),
        "versions": versions,
        "git_commit": _run(["git", "rev-parse", "HEAD"], cwd=ROOT),
        "git_dirty": bool(_run(["git", "status", "--porcelain"], cwd=ROOT)),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable] + sys.argv),
    }


class PeakSampler(threading.Thread):
    """Peak GPU memory (nvidia-smi, MiB per GPU) and host memory in use (GiB) while a case runs."""

    def __init__(self, period=0.5):
        super().__init__(daemon=True)
        self.period, self.stop, self.gpu, self.host_gb = period, threading.Event(), {}, 0.0

    def run(self):
        import psutil

        while not self.stop.is_set():
            out = _run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"])
            for line in out.splitlines():
                try:
                    i, used = (int(x) for x in line.split(","))
                    self.gpu[i] = max(self.gpu.get(i, 0), used)
                except ValueError:
                    pass
            self.host_gb = max(self.host_gb, psutil.virtual_memory().used / 2**30)
            time.sleep(self.period)


def run_config(path: str, model_config: str) -> None:
    """tiny.yaml's train/data/logging sections with the model section of ``model_config``."""
    import yaml

    with open(os.path.join(ROOT, "configs", "tiny.yaml")) as f:
        doc = yaml.safe_load(f)
    with open(model_config) as f:
        doc["model"] = yaml.safe_load(f)["model"]
    with open(path, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)


def run_case(name, gpus, overrides, args, cfg_path, work) -> dict:
    import psutil

    run_dir = os.path.join(work, name)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
           os.path.join(ROOT, "launch", "pretrain.py"), "--config", cfg_path,
           f"train.steps={args.steps}", f"train.global_batch={args.global_batch}", "train.micro_batch=1",
           f"train.seq_len={args.seq_len}", f"model.seq_len={args.seq_len}", "train.precision=bf16",
           "train.warmup_steps=1", f"train.recompute={str(args.recompute).lower()}",
           "eval.interval=0", "checkpoint.interval=0", f"checkpoint.dir={run_dir}/ckpt",
           "logging.interval=1", "logging.tensorboard=false", f"logging.dir={run_dir}", *overrides]
    host_before = psutil.virtual_memory().used / 2**30
    sampler = PeakSampler()
    sampler.start()
    t0 = time.time()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout, cwd=ROOT)
        rc, log = r.returncode, (r.stdout + r.stderr)
    except subprocess.TimeoutExpired as e:
        rc, log = "timeout", ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes)
                              else (e.stdout or ""))
    sampler.stop.set()
    sampler.join()
    records = []
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        records = [json.loads(line) for line in open(path) if '"loss"' in line]
    timed = [r for r in records if r["step"] > args.warmup]
    tps = [r["tokens_per_s"] for r in timed if r.get("tokens_per_s")]
    return {
        "gpus": gpus, "overrides": overrides, "command": " ".join(cmd), "rc": rc,
        "wall_s": round(time.time() - t0, 1), "steps_logged": len(records),
        "tokens_per_s": statistics.median(tps) if tps else None,
        "tokens_per_s_per_gpu": statistics.median(tps) / gpus if tps else None,
        "step_time_s": statistics.median(r["step_time_s"] for r in timed) if timed else None,
        "torch_peak_allocated_gb_rank0": max((r.get("memory_gb") or 0) for r in records) if records else None,
        "nvidia_smi_peak_mib": sampler.gpu,
        "host_used_peak_gb": round(sampler.host_gb, 2), "host_used_before_gb": round(host_before, 2),
        "losses": {r["step"]: r["loss"] for r in records},
        "log_tail": log[-3000:] if rc != 0 else log[-600:],
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--cases", default=",".join(DEFAULT), help=f"comma list of {sorted(CASES)}")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--recompute", action="store_true", help="full layer recomputation (both backends)")
    ap.add_argument("--case-timeout", type=int, default=540)
    ap.add_argument("--model-config", default=os.path.join(ROOT, "configs", "mdn_1.3b.yaml"),
                    help="YAML whose model: section is measured (a smaller one for a smoke run)")
    args = ap.parse_args(argv)
    names = [c for c in args.cases.split(",") if c]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        sys.exit(f"bench_deepspeed: unknown case(s) {unknown}; known: {sorted(CASES)}")
    if args.steps <= args.warmup:
        sys.exit("bench_deepspeed: --steps must exceed --warmup")
    import torch

    report = {"what": "MDN training memory/throughput: DeepSpeed backend vs Megatron backend",
              "model_config": os.path.relpath(args.model_config, ROOT),
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "cases")},
              **environment(), "results": {}}
    work = tempfile.mkdtemp(prefix="bench_ds_")
    cfg_path = os.path.join(work, "run.yaml")
    run_config(cfg_path, args.model_config)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for name in names:
        gpus, overrides = CASES[name]
        if gpus > torch.cuda.device_count():
            report["results"][name] = {"skipped": f"needs {gpus} GPUs, the machine has "
                                                  f"{torch.cuda.device_count()}"}
        else:
            print(f"[bench_deepspeed] {name} on {gpus} GPU(s) ...", flush=True)
            report["results"][name] = run_case(name, gpus, overrides, args, cfg_path, work)
            r = report["results"][name]
            print(f"[bench_deepspeed] {name}: rc {r['rc']}, {r['tokens_per_s']} tok/s, "
                  f"peak {r['torch_peak_allocated_gb_rank0']} GB", flush=True)
        with open(args.out + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(args.out + ".tmp", args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
