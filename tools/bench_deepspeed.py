"""GPU memory and throughput of the 1.3B MDN (configs/mdn_1.3b.yaml): the DeepSpeed backend
(ZeRO 3 on 1 GPU, with and without CPU offload; ZeRO 3 on 2 and 4 GPUs) against the Megatron
backend on the same GPU counts, in one session. Written on a machine without a GPU: not yet run
on one (its whole logic runs on CPU with --cpu-smoke, tests/tools/test_bench_deepspeed.py).

    python tools/bench_deepspeed.py --out $OUT/deepspeed_1p3b.json            # every case that fits
    python tools/bench_deepspeed.py --out X.json --cases ds_z3_offload_1,megatron_1 --steps 6

Cases run side by side on disjoint GPUs (CUDA_VISIBLE_DEVICES): the cases are packed, in the
order given, into waves that fill the machine's GPUs (4 one-GPU cases on a 4-GPU machine, then
two 2-GPU cases, then each 4-GPU case); ``--sequential`` runs one case at a time. Each process
gets OMP_NUM_THREADS = CPUs / GPUs, so concurrent cases share the host's cores evenly; what they
still share is host memory bandwidth and PCIe (offload), which ``concurrent_with`` records.

Each case is one ``torchrun launch/pretrain.py`` of the model on the demo shards (``--data``:
byte tokens, built once before the first case; the token ids fit the GPT-2 vocabulary, and
throughput does not depend on the text), bf16, ``--micro-batch`` × ``--seq-len`` tokens per
microbatch, ``--global-batch`` sequences per step (1 GPU accumulates global_batch / micro_batch
microbatches, 4 GPUs a quarter of that). Recorded per case: the step time (mean over the steps
after ``--warmup``) and tokens/s over all its GPUs and per GPU, the torch peak allocated GPU
memory of rank 0 (torch.cuda.max_memory_allocated, metrics.jsonl memory_gb), the peak resident
host memory of rank 0 (ru_maxrss: where offload keeps parameters, gradients and the optimizer),
the peak nvidia-smi memory of its GPUs (allocator reserve and CUDA context included), the host
memory in use machine-wide (shared with concurrent cases), losses, exit status, its timeout and
command; its whole log goes to CASE.log beside ``--out``.

A case ends at ``--case-timeout`` seconds, or earlier at ``--deadline`` (epoch seconds) so that
one device call ends in time; its process group is then stopped (SIGTERM, then SIGKILL), and the
steps it logged still count. The JSON (card, driver, versions, git commit, date, the commands
of every invocation) is rewritten after every case, and an existing ``--out`` is extended, so
one file gathers several invocations (benchmarks/suite.py's phases) and a call cut short keeps
what finished.

Optimizer under offload: ``ds_z3_offload_1`` hands DeepSpeed torch's AdamW (optimizer.py; no
compiled op, the Megatron backend's update), which DeepSpeed runs on the CPU partitions
(``zero_force_ds_cpu_optimizer: false``); ``ds_z3_offload_cpuadam_1`` uses DeepSpeedCPUAdam,
whose op DeepSpeed compiles on first use (ninja and a C++ compiler; about a minute, inside the
case's time).

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
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# the Megatron backend with its distributed optimizer (ZeRO-1 over dp×cp; on 1 GPU the same as plain)
MEGATRON = ["train.backend=megatron", "parallel.distributed_optimizer=true"]
Z3 = ["train.backend=deepspeed", "deepspeed.zero_stage=3"]
OFFLOAD = ["deepspeed.offload_optimizer=true", "deepspeed.offload_param=true"]
CASES = {  # name: (GPUs, overrides)
    "megatron_1": (1, MEGATRON),
    "ds_z3_offload_1": (1, Z3 + OFFLOAD),
    "ds_z3_offload_cpuadam_1": (1, Z3 + OFFLOAD + ["deepspeed.cpu_adam=true"]),
    "ds_z3_1": (1, Z3),
    "megatron_2": (2, MEGATRON),
    "ds_z3_2": (2, Z3),
    "megatron_4": (4, MEGATRON),
    "ds_z3_4": (4, Z3),
}
DEFAULT = ["megatron_1", "ds_z3_offload_1", "ds_z3_offload_cpuadam_1", "ds_z3_1",
           "megatron_2", "ds_z3_2", "megatron_4", "ds_z3_4"]
MIN_CASE_S = 30  # a case with less time than this before the deadline is not started


def _run(cmd, **kw) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kw).stdout.strip()
    except Exception as e:  # a missing tool is recorded, not fatal
        return f"unavailable ({e})"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


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
        "date_utc": _now(),
    }


def host_used_gb() -> float:
    """Host memory in use machine-wide (MemTotal - MemAvailable)."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0])  # KiB
    return (info["MemTotal"] - info["MemAvailable"]) / 2**20


class PeakSampler(threading.Thread):
    """Peak nvidia-smi memory (MiB) of ``gpus`` and host memory in use (GiB) while a case runs."""

    def __init__(self, gpus: list[int] | None, period=0.5):
        super().__init__(daemon=True)
        self.gpus, self.period = gpus, period
        self.stop, self.gpu, self.host_gb = threading.Event(), {}, 0.0

    def run(self):
        query = ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"]
        if self.gpus:
            query.append("--id=" + ",".join(map(str, self.gpus)))
        while not self.stop.is_set():
            if self.gpus:
                for line in _run(query).splitlines():
                    try:
                        i, used = (int(x) for x in line.split(","))
                        self.gpu[i] = max(self.gpu.get(i, 0), used)
                    except ValueError:
                        pass
            self.host_gb = max(self.host_gb, host_used_gb())
            self.stop.wait(self.period)


def run_config(path: str, model_config: str, data: str) -> None:
    """tiny.yaml's train/logging sections, the model section of ``model_config``, the shards
    in ``data``."""
    import yaml

    with open(os.path.join(ROOT, "configs", "tiny.yaml")) as f:
        doc = yaml.safe_load(f)
    with open(model_config) as f:
        doc["model"] = yaml.safe_load(f)["model"]
    doc["data"]["datasets"] = [data]
    with open(path, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)


def ensure_demo_data(path: str) -> None:
    """The demo shards (the standard library's sources), built once here before any case."""
    if not os.path.exists(os.path.join(path, "manifest.json")):
        from mdn_scale.data.make_shards import make_shards

        make_shards(None, path, progress=False)


def _stop_group(proc: subprocess.Popen) -> None:
    """torchrun and its workers (one process group): SIGTERM (the trainer finishes its step and
    exits), then SIGKILL whatever is left."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            pass


def run_case(name: str, devices: list[int], args, cfg_path: str, work: str, timeout: float,
             threads: int) -> dict:
    gpus, overrides = CASES[name]
    run_dir = os.path.join(work, name)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
           os.path.join(ROOT, "launch", "pretrain.py"), "--config", cfg_path,
           f"train.steps={args.steps}", f"train.global_batch={args.global_batch}",
           f"train.micro_batch={args.micro_batch}", f"train.seq_len={args.seq_len}",
           f"model.seq_len={args.seq_len}", f"train.precision={args.precision}",
           "train.lr=3e-4", "train.warmup_steps=1", f"train.recompute={str(args.recompute).lower()}",
           "eval.interval=0", "checkpoint.interval=0", f"checkpoint.dir={run_dir}/ckpt",
           "logging.interval=1", "logging.tensorboard=false", f"logging.dir={run_dir}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if args.cpu_smoke:
        env["DS_ACCELERATOR"] = "cpu"
    else:  # nvidia-smi numbers GPUs in PCI order: make CUDA use the same
        env.update(CUDA_DEVICE_ORDER="PCI_BUS_ID", CUDA_VISIBLE_DEVICES=",".join(map(str, devices)))
    sampler = PeakSampler(None if args.cpu_smoke else devices)
    sampler.start()
    t0, start = time.time(), _now()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env=env, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        log, _ = proc.communicate()
        rc = "timeout"
    sampler.stop.set()
    sampler.join()
    with open(os.path.join(args.logs, f"{name}.log"), "w") as f:  # the whole log, beside --out
        f.write(log or "")
    records = []
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(path):
        records = [json.loads(line) for line in open(path) if '"loss"' in line]
    times = [r["step_time_s"] for r in records if r["step"] > args.warmup]
    step_s = statistics.mean(times) if times else None  # every timed step's tokens count
    tps = args.global_batch * args.seq_len / step_s if step_s else None
    peak = lambda key: max((r.get(key) or 0) for r in records) if records else None  # noqa: E731
    return {
        "gpus": gpus, "devices": devices, "overrides": overrides, "command": " ".join(cmd),
        "omp_num_threads": threads, "timeout_s": round(timeout), "started_utc": start, "rc": rc,
        "wall_s": round(time.time() - t0, 1), "steps_logged": len(records),
        "step_times_s": times, "step_time_s": step_s,
        "tokens_per_s": tps, "tokens_per_s_per_gpu": tps / gpus if tps else None,
        # on a GPU memory_gb is torch.cuda.max_memory_allocated and host_rss_gb ru_maxrss; on
        # CPU (--cpu-smoke) memory_gb is ru_maxrss
        "torch_peak_allocated_gb_rank0": None if args.cpu_smoke else peak("memory_gb"),
        "host_rss_peak_gb_rank0": peak("memory_gb" if args.cpu_smoke else "host_rss_gb"),
        "nvidia_smi_peak_mib": sampler.gpu,
        "host_used_peak_gb_machine": round(sampler.host_gb, 2),
        "losses": {r["step"]: r["loss"] for r in records},
        "log_tail": (log or "")[-3000:] if rc != 0 else (log or "")[-600:],
    }


def plan_waves(names: list[str], slots: int, sequential: bool):
    """(waves, skipped): each wave a list of (case, device ids) on disjoint devices, in order."""
    waves, skipped, wave, free = [], {}, [], list(range(slots))
    for name in names:
        need = CASES[name][0]
        if need > slots:
            skipped[name] = f"needs {need} GPUs, the machine has {slots}"
            continue
        if need > len(free) or (sequential and wave):
            waves.append(wave)
            wave, free = [], list(range(slots))
        wave.append((name, free[:need]))
        free = free[need:]
    if wave:
        waves.append(wave)
    return waves, skipped


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write (extended if it exists)")
    ap.add_argument("--cases", default=",".join(DEFAULT), help=f"comma list of {list(CASES)}")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--recompute", action="store_true", help="full layer recomputation (both backends)")
    ap.add_argument("--case-timeout", type=int, default=540, help="seconds per case")
    ap.add_argument("--deadline", type=float, default=None,
                    help="epoch seconds by which every case must have ended")
    ap.add_argument("--data", default=os.path.join(ROOT, "data", "stdlib"),
                    help="shards to train on (the demo shards, built here if missing)")
    ap.add_argument("--sequential", action="store_true", help="one case at a time")
    ap.add_argument("--model-config", default=os.path.join(ROOT, "configs", "mdn_1.3b.yaml"),
                    help="YAML whose model: section is measured (a smaller one for a smoke run)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="the whole logic on CPU (gloo, fp32, DS_ACCELERATOR=cpu): a process per "
                         "'GPU', --slots of them; for tests with a small --model-config")
    ap.add_argument("--slots", type=int, default=4, help="with --cpu-smoke: 'GPUs' to pack")
    args = ap.parse_args(argv)
    args.cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {list(CASES)}")
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")
    if args.global_batch % args.micro_batch:
        ap.error("--global-batch must be a multiple of --micro-batch")
    args.precision = "fp32" if args.cpu_smoke else "bf16"  # the Megatron backend: bf16 needs CUDA
    args.logs = os.path.dirname(os.path.abspath(args.out))  # each case's whole log: CASE.log
    return args


def main(argv=None):
    args = parse_args(argv)
    import torch

    slots = args.slots if args.cpu_smoke else torch.cuda.device_count()
    if not slots:
        sys.exit("bench_deepspeed: no CUDA GPU (--cpu-smoke runs the logic on CPU)")
    report = {}
    if os.path.exists(args.out):  # an earlier phase of the same session
        with open(args.out) as f:
            report = json.load(f)
    command = " ".join([sys.executable] + (sys.argv if argv is None else [sys.argv[0], *argv]))
    report.update({"what": "MDN training memory/throughput: DeepSpeed backend vs Megatron backend",
                   "model_config": os.path.relpath(args.model_config, ROOT), **environment(),
                   "command": command})
    report.setdefault("invocations", []).append(
        {"command": command, "date_utc": report["date_utc"], "cases": args.cases,
         "settings": {k: v for k, v in vars(args).items() if k not in ("out", "cases")}})
    results = report.setdefault("results", {})
    lock = threading.Lock()

    def write():
        with lock:
            with open(args.out + ".tmp", "w") as f:
                json.dump(report, f, indent=1)
            os.replace(args.out + ".tmp", args.out)

    waves, skipped = plan_waves(args.cases, slots, args.sequential)
    for name, why in skipped.items():
        results[name] = {"skipped": why}
    os.makedirs(args.logs, exist_ok=True)
    write()
    work = tempfile.mkdtemp(prefix="bench_ds_")
    cfg_path = os.path.join(work, "run.yaml")
    run_config(cfg_path, args.model_config, args.data)
    ensure_demo_data(args.data)
    threads = max(1, (os.cpu_count() or 1) // slots)

    def one(name, devices, together):
        timeout = args.case_timeout
        if args.deadline is not None:
            timeout = min(timeout, args.deadline - time.time())
        if timeout < MIN_CASE_S:
            r = {"skipped": f"{max(timeout, 0):.0f} s left before the deadline"}
        else:
            print(f"[bench_deepspeed] {name} on device(s) {devices}, timeout {timeout:.0f} s", flush=True)
            r = run_case(name, devices, args, cfg_path, work, timeout, threads)
            r["concurrent_with"] = [n for n in together if n != name]
            print(f"[bench_deepspeed] {name}: rc {r['rc']}, {r['tokens_per_s']} tok/s, step "
                  f"{r['step_time_s']} s, torch peak {r['torch_peak_allocated_gb_rank0']} GB, "
                  f"host RSS {r['host_rss_peak_gb_rank0']} GB", flush=True)
        with lock:
            results[name] = r
        write()

    for wave in waves:
        together = [n for n, _ in wave]
        pool = [threading.Thread(target=one, args=(n, d, together)) for n, d in wave]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
