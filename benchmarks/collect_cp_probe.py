"""Collect one CP probe or wgmma bisect call (benchmarks/run_cp_probe_gpu.sh,
run_wgmma_bisect_gpu.sh) into a results JSON: the machine's identity, every trainer step's
grad norms, losses, step time and CP startup check, and every RESULT line of the op checks.

    python benchmarks/collect_cp_probe.py /tmp/p1/cp_probe --plan probe1 \\
        --command "BUDGET_S=555 bash benchmarks/run_cp_probe_gpu.sh \\$OUT" \\
        --out benchmarks/results/cp_wgmma_h100x4.json          # appends under runs[plan]
"""
from __future__ import annotations

import argparse
import glob
import json
import os


def collect(d: str) -> dict:
    steps, checks = {}, {}
    for p in sorted(glob.glob(os.path.join(d, "*.json"))):
        r = json.load(open(p))
        if "grad_norms" not in r:
            continue
        steps[os.path.basename(p)[:-5]] = {k: r.get(k) for k in (
            "card", "torch", "triton", "command", "date_utc", "config", "overrides", "layout",
            "seq_len", "step_ms", "tokens_per_s_per_gpu", "mfu", "peak_memory_gib", "losses",
            "grad_norms", "all_steps_applied", "cp_check")}
    for p in sorted(glob.glob(os.path.join(d, "*.log"))):
        rows = [json.loads(x[len("RESULT "):]) for x in open(p, errors="replace") if x.startswith("RESULT ")]
        if rows:
            checks[os.path.basename(p)[:-4]] = rows
    ident = os.path.join(d, "machine.txt")
    extra = {}
    for name in ("verdict.txt", "pick.txt", "pick_value.txt"):
        f = os.path.join(d, name)
        if os.path.exists(f):
            extra[name[:-4]] = open(f).read().strip()
    return dict(machine=open(ident).read() if os.path.exists(ident) else None, steps=steps,
                op_checks=checks, **extra)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir")
    ap.add_argument("--plan", required=True)
    ap.add_argument("--command", required=True)
    ap.add_argument("--date", default=None)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    doc = json.load(open(a.out)) if os.path.exists(a.out) else {"runs": {}}
    run = collect(a.dir)
    run["command"] = a.command
    if a.date:
        run["date_utc"] = a.date
    doc["runs"][a.plan] = run
    with open(a.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"{a.out}: runs[{a.plan}]: {len(run['steps'])} steps, {len(run['op_checks'])} op checks")


if __name__ == "__main__":
    main()
