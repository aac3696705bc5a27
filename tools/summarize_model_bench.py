"""Table of tools/bench_model.py results, with the issue-9 ratios.

    python tools/summarize_model_bench.py DIR_OR_JSON... [--json summary.json]

Per result: tokens/s per GPU, step time, MFU, peak memory. Then, where the runs are there:
  peers     tokens/s of each mixer over our gdn's (same model size, layout, sequence length,
            batch): goal MDN >= 0.85x GDN;
  cp_weak   CP = R at seq_len R·S against CP = 1 at S (same model and batch): efficiency =
            tokens/s per GPU (CP = R) / tokens/s per GPU (CP = 1); goal >= 0.9 at R = 4;
  pipeline  PP > 1 against PP = 1 with the same model, batch and overrides: largest relative
            difference of the timed and warm-up losses, and the throughput ratio.
"""
from __future__ import annotations

import argparse
import glob
import json
import os


def load(paths):
    recs = {}
    for p in paths:
        # a folder: its JSON files, and benchmarks/suite.py's per-job folders (JOB/result.json)
        files = (sorted(glob.glob(os.path.join(p, "*.json")) + glob.glob(os.path.join(p, "*", "result.json")))
                 if os.path.isdir(p) else [p])
        for f in files:
            try:
                with open(f) as fh:
                    r = json.load(fh)
            except (OSError, ValueError):
                continue
            if isinstance(r, dict) and r.get("benchmark", "").startswith("whole-model"):
                name = os.path.splitext(os.path.basename(f))[0]
                if name == "result":   # a suite job's JOB/result.json: named by its job
                    name = os.path.basename(os.path.dirname(os.path.abspath(f)))
                recs[name] = r
    return recs


def size_key(r):
    m = r["model"]
    return (m["hidden_size"], m["num_layers"], m["num_heads"], m["head_k_dim"])


def layout_key(r):
    lay = r["layout"]
    return (lay["tp"], lay["cp"], lay["pp"], lay["vp"], lay["dp"], lay["sp"])


def rel_diff(a, b):
    if not a or len(a) != len(b):
        return None
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def summarize(recs):
    rows = []
    for name, r in sorted(recs.items()):
        lay = r["layout"]
        rows.append(dict(name=name, mixer=r["mixer"], params_m=r["params_counted"] / 1e6,
                         layout=f"tp{lay['tp']} cp{lay['cp']} pp{lay['pp']} vp{lay['vp']} dp{lay['dp']}",
                         seq_len=r["seq_len"], global_batch=r["global_batch"],
                         tokens_per_s_per_gpu=r["tokens_per_s_per_gpu"], step_ms=r["step_ms_median"],
                         mfu=r["mfu"], peak_memory_gib=r["peak_memory_gib"]))
    peers, cp_weak, pipeline = [], [], []
    items = list(recs.items())
    for name, r in items:  # peers: against our gdn, same everything else
        if r["mixer"] == "gdn":
            continue
        for gname, g in items:
            if (g["mixer"] == "gdn" and size_key(g) == size_key(r) and layout_key(g) == layout_key(r)
                    and g["seq_len"] == r["seq_len"] and g["global_batch"] == r["global_batch"]):
                peers.append(dict(name=name, vs=gname, mixer=r["mixer"],
                                  ratio=r["tokens_per_s_per_gpu"] / g["tokens_per_s_per_gpu"]))
    for name, r in items:
        lay = r["layout"]
        if lay["cp"] > 1:
            for bname, b in items:
                bl = b["layout"]
                if (bl["cp"] == 1 and bl["tp"] == lay["tp"] and bl["pp"] == lay["pp"] and bl["dp"] == lay["dp"]
                        and b["mixer"] == r["mixer"] and size_key(b) == size_key(r)
                        and b["seq_len"] * lay["cp"] == r["seq_len"]
                        and b["micro_batch"] == r["micro_batch"]
                        and b["microbatches_per_rank"] == r["microbatches_per_rank"]):
                    cp_weak.append(dict(name=name, vs=bname, cp=lay["cp"],
                                        efficiency=r["tokens_per_s_per_gpu"] / b["tokens_per_s_per_gpu"],
                                        peak_memory_gib=r["peak_memory_gib"],
                                        baseline_peak_memory_gib=b["peak_memory_gib"]))
        if lay["pp"] > 1:
            for bname, b in items:
                bl = b["layout"]
                if (bl["pp"] == 1 and bl["tp"] == lay["tp"] and bl["cp"] == lay["cp"]
                        and b["mixer"] == r["mixer"] and size_key(b) == size_key(r)
                        and b["seq_len"] == r["seq_len"] and b["global_batch"] == r["global_batch"]
                        and b.get("overrides") == r.get("overrides")):
                    pipeline.append(dict(
                        name=name, vs=bname, pp=lay["pp"], vp=lay["vp"], schedule=lay["schedule"],
                        loss_max_rel_diff=rel_diff(r["losses"], b["losses"]),
                        warmup_loss_max_rel_diff=rel_diff(r["warmup_losses"], b["warmup_losses"]),
                        throughput_ratio=r["tokens_per_s"] / b["tokens_per_s"],
                        tokens_per_s_per_gpu=r["tokens_per_s_per_gpu"]))
    return dict(rows=rows, peers=peers, cp_weak=cp_weak, pipeline=pipeline)


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--json", default=None, help="also write the summary here")
    a = ap.parse_args(argv)
    recs = load(a.paths)
    s = summarize(recs)
    if recs:
        first = next(iter(recs.values()))
        print(f"card {first['card']}, torch {first['torch']}, triton {first.get('triton')}, "
              f"{first['precision']}, MFU: {first['mfu_definition']}")
    print(f"{'case':24s} {'mixer':13s} {'params':>7s} {'layout':22s} {'seq':>6s} {'batch':>5s} "
          f"{'tok/s/GPU':>10s} {'step ms':>8s} {'MFU':>6s} {'mem GiB':>7s}")
    for r in s["rows"]:
        print(f"{r['name']:24s} {r['mixer']:13s} {r['params_m']:6.0f}M {r['layout']:22s} "
              f"{r['seq_len']:6d} {r['global_batch']:5d} {r['tokens_per_s_per_gpu']:10,.0f} "
              f"{r['step_ms']:8.1f} {100 * r['mfu']:5.1f}% {fmt(r['peak_memory_gib'], '7.1f')}")
    for p in s["peers"]:
        print(f"peer  {p['name']} / {p['vs']}: {p['ratio']:.3f}x tokens/s")
    for c in s["cp_weak"]:
        print(f"cp    {c['name']} (CP={c['cp']}) vs {c['vs']}: weak-scaling efficiency {c['efficiency']:.3f}")
    for p in s["pipeline"]:
        print(f"pp    {p['name']} ({p['schedule']}) vs {p['vs']}: loss max rel diff "
              f"{fmt(p['loss_max_rel_diff'], '.2e')} (warm-up {fmt(p['warmup_loss_max_rel_diff'], '.2e')}), "
              f"throughput {p['throughput_ratio']:.3f}x of PP=1 (total tokens/s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(s, f, indent=2)


if __name__ == "__main__":
    main()
