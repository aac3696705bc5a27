"""Find the longest context of a model that trains on G GPUs: start at the memory estimate's
longest (rounded down to the ladder 2^k, 3·2^(k−1) tokens), step up the ladder on success and
down on out-of-memory until a fitting and a failing length are neighbours, and record every
attempt (each a torchrun of benchmarks/longctx_memory.py, 2 optimizer steps).

    python benchmarks/longctx_search.py --model configs/mdn_1.3b.yaml --gpus 4 \\
        --out results/longctx_search.json [--start 1048576] [--max-attempts 3] [--card-gib 79.1] \\
        [--timeout 150] [--budget-s 300] [--loss-chunk-tokens 4096]

Each attempt is appended to --out right away (the device's 10-minute calls may cut a search
short; --start resumes it) with the card, versions, date and command. An attempt that runs past
--timeout is stopped with its whole process group (torchrun and its workers); it counts as
fitting only if its report (peak memory, no skipped step) came before the stop; no attempt starts when less than --timeout of --budget-s is left. The layout (TP, CP,
recompute) is the estimator's choice for the start length, kept for the whole search; --cp-only
forces TP = 1. The optimizer is ZeRO-1 over dp×cp (parallel.distributed_optimizer), as in
configs/longctx, and the loss is chunked (model.loss_chunk_tokens) unless --loss-chunk-tokens 0.

    # rebuild the records of an earlier search from the attempt logs it saved beside --out
    # (search_<seq_len>.log), with this version's reading of the output
    python benchmarks/longctx_search.py --model M --gpus G --out search.json --reparse new.json
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


MARKER = "LONGCTX_MEMORY "


def attempt(model: str, gpus: int, seq_len: int, tp: int, cp: int, recompute: bool, timeout: int,
            loss_chunk_tokens: int = 4096, log_path: str | None = None, offload: bool = False) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
           os.path.join(ROOT, "benchmarks", "longctx_memory.py"), "--model", model,
           "--seq-len", str(seq_len), "--tp", str(tp), "--cp", str(cp), "--steps", "2",
           "--distributed-optimizer", "--loss-chunk-tokens", str(loss_chunk_tokens)]
    if recompute:
        cmd.append("--recompute")
    if recompute and offload:
        cmd.append("--offload")
    base = {"seq_len": seq_len, "tp": tp, "cp": cp, "recompute": recompute, "gpus": gpus,
            "recompute_offload": recompute and offload,
            "loss_chunk_tokens": loss_chunk_tokens, "command": " ".join(cmd[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    t0 = time.time()
    out, timed_out, returncode = run_logged(cmd, timeout, log_path)
    return record_from_output(base, out, timed_out, returncode, time.time() - t0)


def run_logged(cmd: list, timeout: float, log_path: str | None = None) -> tuple[str, bool, int | None]:
    """Run cmd in its own session for at most `timeout` seconds → (output, timed out, return
    code). With log_path the output goes to that file as it comes (after the command line), so an
    attempt stopped from outside (the device call's limit ends the search itself) leaves what it
    printed; session 10's killed 512K attempt left only its command line."""
    log = open(log_path, "w") if log_path else None
    if log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
    # Own session: a timeout stops torchrun and every worker it started (a worker left behind
    # would hold its GPU's memory through the next attempt).
    p = subprocess.Popen(cmd, stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                         start_new_session=True)

    def stop(signum, frame):  # an outer `timeout` stops the search: take the attempt with it
        os.killpg(p.pid, signal.SIGKILL)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    out = ""
    try:
        out, _ = p.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        timed_out = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        if log:   # every rank's whole output: the record keeps only its tail
            log.close()
            with open(log_path) as f:
                out = f.read().split("\n", 1)[1]
    return out or "", timed_out, p.returncode


def reports_in(out: str) -> list[dict]:
    """Every `LONGCTX_MEMORY {json}` report in a run's output. Ranks that run out of memory
    print theirs at once, so two reports can share one line: each is decoded where its marker
    starts, up to the end of its JSON object."""
    dec, found, i = json.JSONDecoder(), [], out.find(MARKER)
    while i >= 0:
        obj, end = dec.raw_decode(out, i + len(MARKER))
        found.append(obj)
        i = out.find(MARKER, end)
    return found


def record_from_output(base: dict, out: str, timed_out: bool, returncode, wall_s: float) -> dict:
    """One attempt's record. A report printed before the timeout stands (the measurement is
    complete: session 9's 512K run printed its peak after 138 s of training and was stopped
    while shutting down); `timeout` says the attempt ran past its limit either way."""
    reports = reports_in(out)
    if reports:
        rec = next((r for r in reports if r.get("oom")), reports[-1])
        return {**base, **rec, "timeout": timed_out, "wall_s": wall_s, "returncode": returncode}
    if timed_out:
        return {**base, "timeout": True, "oom": "out of memory" in out.lower(), "wall_s": wall_s,
                "tail": out[-2000:]}
    return {**base, "failed": True, "oom": "out of memory" in out.lower(), "returncode": returncode,
            "wall_s": wall_s, "tail": out[-2000:]}


def reparse(out: str, new_out: str) -> int:
    """--reparse: each record of `out` rebuilt from its attempt's log (the log's first line is
    the command), keeping what the log does not hold: the attempt's settings, timeout and wall
    time."""
    records = json.load(open(out))
    rebuilt = []
    for rec in records:
        log = f"{os.path.splitext(out)[0]}_{rec['seq_len']}.log"
        if not os.path.isfile(log):
            sys.exit(f"--reparse: no log {log} for the attempt at {rec['seq_len']} tokens")
        text = open(log).read().split("\n", 1)[-1]
        base = {k: rec[k] for k in ("seq_len", "tp", "cp", "recompute", "gpus", "loss_chunk_tokens",
                                    "command", "date") if k in rec}
        new = record_from_output(base, text, bool(rec.get("timeout")), rec.get("returncode"),
                                 rec["wall_s"])
        new.update({k: rec[k] for k in ("estimated_longest", "search_card_gib") if k in rec},
                   reparsed_from=os.path.basename(log))
        rebuilt.append(new)
    # attempts whose record was never written (the search stopped while reading their output)
    import glob
    stem = os.path.splitext(out)[0]
    done = {r["seq_len"] for r in records}
    for log in sorted(glob.glob(f"{stem}_*.log")):
        seq = log[len(stem) + 1:-len(".log")]
        if not seq.isdigit() or int(seq) in done:
            continue
        command, _, text = open(log).read().partition("\n")
        new = record_from_output({"seq_len": int(seq), "command": command}, text, False, None, None)
        new.update(reparsed_from=os.path.basename(log), record_missing=True)
        rebuilt.append(new)
    with open(new_out, "w") as f:
        json.dump(rebuilt, f, indent=1)
    for r in rebuilt:
        print(f"{r['seq_len']:,} tokens on {r.get('gpus')} GPU(s): "
              + ("out of memory" if r.get("oom") else
                 f"peak {r['measured_peak_gib']:.1f} GiB, {r.get('skipped_steps')} skipped steps"
                 if "measured_peak_gib" in r else "no report"))
    return 0


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
    ap.add_argument("--offload", action="store_true",
                    help="train.recompute_offload: the layers' kept inputs in host memory")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per attempt")
    ap.add_argument("--budget-s", type=int, default=0, help="total seconds (0: no limit)")
    ap.add_argument("--loss-chunk-tokens", type=int, default=4096)
    ap.add_argument("--reparse", metavar="NEW_OUT", help="rebuild --out's records from their logs "
                    "into NEW_OUT; runs nothing")
    a = ap.parse_args(argv)
    if a.reparse:
        return reparse(a.out, a.reparse)
    t_start = time.time()

    import yaml

    from mdn_scale.model import ModelConfig
    from mdn_scale.train.memory import longest_context

    with open(a.model) as f:
        cfg = ModelConfig.from_dict(yaml.safe_load(f)["model"])
    cfg = dataclasses.replace(cfg, loss_chunk_tokens=a.loss_chunk_tokens)
    best = longest_context(cfg, a.gpus, a.card_gib, allow_tp=not a.cp_only, offload=a.offload)
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
                      log_path=f"{os.path.splitext(a.out)[0]}_{seq}.log", offload=a.offload)
        rec.update(estimated_longest=best["seq_len"], search_card_gib=a.card_gib)
        records.append(rec)
        with open(a.out, "w") as f:
            json.dump(records, f, indent=1)
        # fits: a measured peak with no OOM and no skipped step (a report that came before the
        # attempt's timeout counts: the two steps were done)
        ok = "measured_peak_gib" in rec and not (rec.get("oom") or rec.get("failed")
                                                 or rec.get("skipped_steps"))
        print(f"gpus={a.gpus} seq_len={seq:,} tp={tp} cp={cp} recompute={rc}: "
              + (f"fits, peak {rec['measured_peak_gib']:.1f} GiB (estimate {rec['estimate_allocated_gib']:.1f})"
                 + (" (its shutdown ran past the timeout)" if rec.get("timeout") else "")
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
