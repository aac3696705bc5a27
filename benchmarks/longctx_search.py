"""Find the longest context of a model that trains on G GPUs: start at the memory estimate's
longest, then step down on out-of-memory / up on success (benchmarks/longctx_memory.py runs each
attempt in its own torchrun), and record every attempt.

    python benchmarks/longctx_search.py --model configs/mdn_1.3b.yaml --gpus 4 \\
        --out results/longctx_search.json [--start 1048576] [--max-attempts 4] [--card-gib 79.1]

Each attempt appends to --out right away (the device's 10-minute calls may cut a search short;
--start resumes it). The layout (TP, CP, recompute) is the estimator's choice for the start
length, kept for the whole search; --cp-only forces TP = 1. The optimizer is ZeRO-1 over dp×cp
(parallel.distributed_optimizer), as in configs/longctx.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def attempt(model: str, gpus: int, seq_len: int, tp: int, cp: int, recompute: bool, timeout: int) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
           os.path.join(ROOT, "benchmarks", "longctx_memory.py"), "--model", model,
           "--seq-len", str(seq_len), "--tp", str(tp), "--cp", str(cp), "--steps", "2",
           "--distributed-optimizer"]
    if recompute:
        cmd.append("--recompute")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"seq_len": seq_len, "tp": tp, "cp": cp, "recompute": recompute, "timeout": True}
    for line in r.stdout.splitlines():
        if line.startswith("LONGCTX_MEMORY "):
            return json.loads(line[len("LONGCTX_MEMORY "):])
    tail = (r.stdout + r.stderr)[-2000:]
    return {"seq_len": seq_len, "tp": tp, "cp": cp, "recompute": recompute, "failed": True,
            "oom": "out of memory" in tail.lower(), "tail": tail}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--gpus", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--start", type=int, default=0, help="first length to try (default: the estimate)")
    ap.add_argument("--max-attempts", type=int, default=4)
    ap.add_argument("--card-gib", type=float, default=79.1)
    ap.add_argument("--cp-only", action="store_true")
    ap.add_argument("--timeout", type=int, default=540)
    a = ap.parse_args(argv)

    import yaml

    from mdn_scale.model import ModelConfig
    from mdn_scale.train.memory import longest_context

    with open(a.model) as f:
        cfg = ModelConfig.from_dict(yaml.safe_load(f)["model"])
    best = longest_context(cfg, a.gpus, a.card_gib, allow_tp=not a.cp_only)
    if best is None:
        print("the estimate says no context fits", file=sys.stderr)
        return 1
    tp, cp, rc = best["tp"], best["cp"], best["recompute"]
    step = 1024 * cp
    seq = a.start or best["seq_len"]
    seq -= seq % step
    records = json.load(open(a.out)) if os.path.isfile(a.out) else []
    fits, fails = 0, None
    for _ in range(a.max_attempts):
        rec = attempt(a.model, a.gpus, seq, tp, cp, rc, a.timeout)
        rec.update(gpus=a.gpus, estimated_longest=best["seq_len"])
        records.append(rec)
        with open(a.out, "w") as f:
            json.dump(records, f, indent=1)
        ok = not (rec.get("oom") or rec.get("failed") or rec.get("timeout"))
        print(f"gpus={a.gpus} seq_len={seq:,} tp={tp} cp={cp} recompute={rc}: "
              + (f"fits, peak {rec['measured_peak_gib']:.1f} GiB (estimate {rec['estimate_allocated_gib']:.1f})"
                 if ok else "does not fit" if rec.get("oom") else "failed/timeout"), flush=True)
        if ok:
            fits = max(fits, seq)
            nxt = int(seq * 1.15) if fails is None else (seq + fails) // 2
        else:
            fails = seq if fails is None else min(fails, seq)
            nxt = int(seq * 0.85) if fits == 0 else (fits + seq) // 2
        nxt -= nxt % step
        if nxt in (seq, fits) or nxt <= 0:
            break
        seq = nxt
    print(f"longest that trained on {a.gpus} GPU(s): {fits:,} tokens" if fits else
          f"nothing trained on {a.gpus} GPU(s) in {a.max_attempts} attempts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
