"""Find the longest context of a model that trains on G GPUs: start at the memory estimate's
longest (rounded down to the ladder 2^k, 3·2^(k−1) tokens), step up the ladder on success and
down on out-of-memory until a fitting and a failing length are neighbours, and record every
attempt (each a torchrun of benchmarks/longctx_memory.py, 2 optimizer steps).

    python benchmarks/longctx_search.py --model configs/mdn_1.3b.yaml --gpus 4 \\
        --out results/longctx_search.json [--start 1048576] [--max-attempts 3] [--card-gib 79.1] \\
        [--timeout 150] [--budget-s 300] [--loss-chunk-tokens 4096]

Each attempt is appended to --out right away (the device's 10-minute calls may cut a search
short; --start resumes it) with the card, versions, date and command. An attempt that runs past
--timeout is stopped with its whole process group (torchrun and its workers) and counted as not
fitting; no attempt starts when less than --timeout of --budget-s is left. The layout (TP, CP,
recompute) is the estimator's choice for the start length, kept for the whole search; --cp-only
forces TP = 1. The optimizer is ZeRO-1 over dp×cp (parallel.distributed_optimizer), as in
configs/longctx, and the loss is chunked (model.loss_chunk_tokens) unless --loss-chunk-tokens 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def attempt(model: str, gpus: int, seq_len: int, tp: int, cp: int, recompute: bool, timeout: int,
            loss_chunk_tokens: int = 4096, log_path: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
           os.path.join(ROOT, "benchmarks", "longctx_memory.py"), "--model", model,
           "--seq-len", str(seq_len), "--tp", str(tp), "--cp", str(cp), "--steps", "2",
           "--distributed-optimizer", "--loss-chunk-tokens", str(loss_chunk_tokens)]
    if recompute:
        cmd.append("--recompute")
    base = {"seq_len": seq_len, "tp": tp, "cp": cp, "recompute": recompute, "gpus": gpus,
            "loss_chunk_tokens": loss_chunk_tokens, "command": " ".join(cmd[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    t0 = time.time()
    # Own session: a timeout stops torchrun and every worker it started (a worker left behind
    # would hold its GPU's memory through the next attempt).
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                         start_new_session=True)

    def stop(signum, frame):  # an outer `timeout` stops the search: take the attempt with it
        os.killpg(p.pid, signal.SIGKILL)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    out = ""
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        return {**base, "timeout": True, "oom": "out of memory" in (out or "").lower(),
                "wall_s": time.time() - t0, "tail": (out or "")[-2000:]}
    finally:
        signal.signal(signal.SIGTERM, previous)
        if log_path:  # every rank's whole output: the record keeps only its tail
            with open(log_path, "w") as f:
                f.write(" ".join(cmd) + "\n" + (out or ""))
    reports = [json.loads(ln[len("LONGCTX_MEMORY "):]) for ln in out.splitlines()
               if ln.startswith("LONGCTX_MEMORY ")]
    if reports:
        rec = next((r for r in reports if r.get("oom")), reports[-1])
        return {**base, **rec, "wall_s": time.time() - t0, "returncode": p.returncode}
    return {**base, "failed": True, "oom": "out of memory" in out.lower(), "returncode": p.returncode,
            "wall_s": time.time() - t0, "tail": out[-2000:]}


def ladder(step: int, upto: int) -> list[int]:
    """Multiples of `step` of the form 2^k or 3·2^(k−1) tokens (rounded down to `step`), ascending."""
    vals, k = set(), 10
    while (1 << k) <= upto:
        for v in (1 << k, 3 << (k - 1)):
            v -= v % step
            if 0 < v <= upto:
                vals.add(v)
        k += 1
    return sorted(vals)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--gpus", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--start", type=int, default=0, help="first length to try (default: the estimate)")
    ap.add_argument("--max-attempts", type=int, default=3)
    ap.add_argument("--card-gib", type=float, default=79.1)
    ap.add_argument("--cp-only", action="store_true")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per attempt")
    ap.add_argument("--budget-s", type=int, default=0, help="total seconds (0: no limit)")
    ap.add_argument("--loss-chunk-tokens", type=int, default=4096)
    a = ap.parse_args(argv)
    t_start = time.time()

    import yaml

    from mdn_scale.model import ModelConfig
    from mdn_scale.train.memory import longest_context

    with open(a.model) as f:
        cfg = ModelConfig.from_dict(yaml.safe_load(f)["model"])
    cfg = dataclasses.replace(cfg, loss_chunk_tokens=a.loss_chunk_tokens)
    best = longest_context(cfg, a.gpus, a.card_gib, allow_tp=not a.cp_only)
    if best is None:
        print("the estimate says no context fits", file=sys.stderr)
        return 1
    tp, cp, rc = best["tp"], best["cp"], best["recompute"]
    step = 1024 * cp
    rungs = ladder(step, 1 << 26)
    first = a.start or best["seq_len"]
    below = [v for v in rungs if v <= first]
    seq = below[-1] if below else rungs[0]
    records = json.load(open(a.out)) if os.path.isfile(a.out) else []
    fits, fails = 0, None
    for _ in range(a.max_attempts):
        if a.budget_s and time.time() - t_start + a.timeout > a.budget_s:
            print(f"budget: {a.budget_s} s would not cover another attempt of up to {a.timeout} s", flush=True)
            break
        rec = attempt(a.model, a.gpus, seq, tp, cp, rc, a.timeout, loss_chunk_tokens=a.loss_chunk_tokens,
                      log_path=f"{os.path.splitext(a.out)[0]}_{seq}.log")
        rec.update(estimated_longest=best["seq_len"], search_card_gib=a.card_gib)
        records.append(rec)
        with open(a.out, "w") as f:
            json.dump(records, f, indent=1)
        ok = not (rec.get("oom") or rec.get("failed") or rec.get("timeout") or rec.get("skipped_steps"))
        print(f"gpus={a.gpus} seq_len={seq:,} tp={tp} cp={cp} recompute={rc}: "
              + (f"fits, peak {rec['measured_peak_gib']:.1f} GiB (estimate {rec['estimate_allocated_gib']:.1f})"
                 if ok else "does not fit (out of memory)" if rec.get("oom") else
                 "timeout" if rec.get("timeout") else
                 f"non-finite loss or gradients ({rec['skipped_steps']} steps skipped): did not train"
                 if rec.get("skipped_steps") else "failed"), flush=True)
        if ok:
            fits = max(fits, seq)
            nxt = [v for v in rungs if v > seq and (fails is None or v < fails)]
            nxt = nxt[0] if nxt else None
        else:
            fails = seq if fails is None else min(fails, seq)
            nxt = [v for v in rungs if v < seq and v > fits]
            nxt = nxt[-1] if nxt else None
        if nxt is None:
            break
        seq = nxt
    print(f"longest that trained on {a.gpus} GPU(s): {fits:,} tokens" if fits else
          f"nothing trained on {a.gpus} GPU(s) in {a.max_attempts} attempts", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
