"""Plots of the recorded GPU results (benchmarks/results/*.json) for BENCHMARKS.md.

    python tools/plot_benchmarks.py            # writes benchmarks/results/*.png

Reads only files the benchmark scripts wrote; a missing file skips its plot.
"""
from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results")
KERNEL_RUNS = [("v3", "kernels_h100_v3.json"), ("v4 fused", "kernels_h100_v4_fused.json")]


def _load(name):
    path = os.path.join(RESULTS, name)
    return json.load(open(path)) if os.path.exists(path) else None


def plot_kernels(out):
    labels, ratios_fb, ratios_f, ratios_mem = [], [], [], []
    for label, name in KERNEL_RUNS:
        d = _load(name)
        if not d:
            continue
        row = d["results"][0]
        if "ratio_fwd_bwd" not in row:
            continue
        labels.append(label)
        ratios_f.append(row["ratio_fwd"])
        ratios_fb.append(row["ratio_fwd_bwd"])
        ratios_mem.append(row["ratio_peak_mem"])
    if not labels:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = range(len(labels))
    w = 0.27
    ax.bar([i - w for i in x], ratios_f, w, label="forward")
    ax.bar(list(x), ratios_fb, w, label="forward+backward")
    ax.bar([i + w for i in x], ratios_mem, w, label="peak memory")
    ax.axhline(1.5, color="k", ls="--", lw=1, label="target: 1.5x (time)")
    ax.axhline(1.3, color="gray", ls=":", lw=1, label="target: 1.3x (memory)")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("MDN / FLA GDN (same run)")
    ax.set_title("mdn_chunk vs FLA GDN, H100 bf16, B=8 T=4096 H=6 K=128 V=256", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def plot_cp(out):
    d = _load("cp_h100x4_r4.json")
    if not d:
        return None
    weak = d["results"]["weak"]
    names = ["cp1", "allgather", "ring"]
    ms = [weak[n]["median_ms"] for n in names]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(["CP=1\n(32K tokens)", "CP=4 all-gather\n(per rank)", "CP=4 ring\n(per rank)"], ms,
           color=["gray", "tab:blue", "tab:orange"])
    for i, n in enumerate(names[1:], 1):
        ax.text(i, ms[i], f"eff {weak[n]['efficiency']:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("fwd+bwd ms")
    ax.set_title("MDN op weak scaling, 4 H100, bf16, 32K tokens/GPU", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out-dir", default=RESULTS)
    a = ap.parse_args()
    for fn, name in ((plot_kernels, "kernels_vs_gdn.png"), (plot_cp, "cp_weak_scaling.png")):
        path = fn(os.path.join(a.out_dir, name))
        print("wrote" if path else "skipped (no results)", name)


if __name__ == "__main__":
    main()
