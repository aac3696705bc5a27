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
from matplotlib.patches import Patch  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results")
KERNEL_RUNS = [("v3", "kernels_h100_v3.json"), ("v4 fused", "kernels_h100_v4_fused.json"),
               ("v7 mode 1", "kernels_h100_v7_fla_same_run.json"),
               ("v12 tuned\nlaunches", "kernels_h100_v12_tuned_vs_old_k128.json"),
               ("v15 W saved\n(H200)", "kernels_h200_v13_save_w_k128_rerun.json"),
               ("v16 raw q, k\n(H200)", "kernels_h200_v15_raw_qk_k128.json")]


def _finish(fig, ax, out, ylabel, title):
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def _finish_panels(fig, out, found: bool, title: str):
    """A multi-panel figure's end: nothing written (None) where no panel found its results,
    else the title over all panels and the PNG."""
    if not found:
        plt.close(fig)
        return None
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


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
    fig, ax = plt.subplots(figsize=(7.5, 3.5))
    x = range(len(labels))
    w = 0.27
    ax.bar([i - w for i in x], ratios_f, w, label="forward")
    ax.bar(list(x), ratios_fb, w, label="forward+backward")
    ax.bar([i + w for i in x], ratios_mem, w, label="peak memory")
    ax.axhline(1.5, color="k", ls="--", lw=1, label="target: 1.5x (time)")
    ax.axhline(1.3, color="gray", ls=":", lw=1, label="target: 1.3x (memory)")
    ax.set_xticks(list(x), labels, fontsize=8)
    return _finish(fig, ax, out, "MDN / FLA GDN (same run)",
                   "mdn_chunk vs FLA GDN, H100 (last two: H200) bf16, B=8 T=4096 H=6 K=128 V=256")


CP_RUNS = [("v3", "cp_h100x4_r4.json"), ("v4", "cp_h100x4_v4_r4.json"), ("v5", "cp_h100x4_v5_r4.json"),
           ("v6", "cp_h100x4_v6_r4.json"), ("v7 (s8)", "cp_h100x4_v7_r4_weak_tuned.json"),
           ("v8 (s9)", "cp_h100x4_v8_r4.json")]


def plot_cp(out):
    """Weak scaling at R = 4 per version of the op: ms per rank of CP=1 and each mode."""
    runs = [(label, d["results"]["weak"]) for label, name in CP_RUNS if (d := _load(name))]
    if not runs:
        return None
    names = [("cp1", "CP=1 (32K tokens)", "gray"), ("allgather", "CP=4 all-gather", "tab:blue"),
             ("ring", "CP=4 ring", "tab:orange")]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(names)
    for j, (key, label, color) in enumerate(names):
        # a run that did not time a mode (v6 and v7: all-gather only) has no bar for it
        pts = [(i + (j - 1) * width, w[key]) for i, (_, w) in enumerate(runs) if key in w]
        ax.bar([x for x, _ in pts], [r["median_ms"] for _, r in pts], width, label=label, color=color)
        if key != "cp1":
            for x, r in pts:
                ax.text(x, r["median_ms"], f"{r['efficiency']:.2f}", ha="center", va="bottom",
                        fontsize=7)
    ax.set_xticks(range(len(runs)), [f"op {label}" for label, _ in runs])
    ax.set_ylabel("fwd+bwd ms per rank (labels: efficiency)")
    ax.set_title("MDN op weak scaling, 4 H100, bf16, 32K tokens/GPU", fontsize=9)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.25)
    ax.legend(fontsize=7, loc="upper left", ncol=3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def plot_cp_scaling(out):
    """Session 9's CP run (plans cp8, cp9): weak scaling of MDN against FLA's CP GDN, strong
    scaling at 128K tokens and per-rank memory, R = 1, 2, 4."""
    mdn = {r: _load(f"cp_h100x4_v8_r{r}.json") for r in (2, 4)}
    fla = {r: _load(f"cp_h100x4_v8_fla_r{r}.json") for r in (2, 4)}
    if not all(mdn.values()):
        return None
    weak = {r: d["results"]["weak"] for r, d in mdn.items()}
    strong = {r: d["results"]["strong"] for r, d in mdn.items()}
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 3.8))
    rs = [1, 2, 4]
    a1.plot(rs, [weak[4]["cp1"]["median_ms"]] + [weak[r]["allgather"]["median_ms"] for r in (2, 4)],
            marker="o", label="MDN all-gather")
    a1.plot(rs, [weak[4]["cp1"]["median_ms"]] + [weak[r]["ring"]["median_ms"] for r in (2, 4)],
            marker="s", label="MDN ring")
    if all(fla.values()) and all("median_ms" in f["results"].get("fla_gdn_cp", {}) for f in fla.values()):
        a1.plot(rs, [fla[4]["results"]["fla_gdn_cp1"]["median_ms"]]
                + [fla[r]["results"]["fla_gdn_cp"]["median_ms"] for r in (2, 4)],
                marker="^", label="FLA GDN (fla.ops.cp)")
    a1.set_xlabel("CP ranks R (32K tokens each)")
    a1.set_ylabel("fwd+bwd ms per rank")
    a1.set_title("weak scaling (flat = efficiency 1)", fontsize=9)
    for key, mark, label in (("allgather", "o", "all-gather"), ("ring", "s", "ring")):
        a2.plot(rs, [strong[4]["cp1"]["median_ms"]] + [strong[r][key]["median_ms"] for r in (2, 4)],
                marker=mark, label=label)
    a2.plot(rs, [strong[4]["cp1"]["median_ms"] / r for r in rs], ls=":", color="gray", label="1/R")
    a2.set_xlabel("CP ranks R (one 128K sequence)")
    a2.set_ylabel("fwd+bwd ms per rank")
    a2.set_title("strong scaling", fontsize=9)
    gib = 2 ** 30
    a3.plot(rs, [max(strong[4]["cp1"]["peak_mem_bytes_per_rank"]) / gib]
            + [max(strong[r]["allgather"]["peak_mem_bytes_per_rank"]) / gib for r in (2, 4)],
            marker="o", label="all-gather (CP = 1: lean mode 1)")
    a3.plot(rs, [max(strong[4]["cp1_mode0"]["peak_mem_bytes_per_rank"]) / gib / r for r in rs],
            ls=":", color="gray", label="mode 0 at CP = 1, / R")
    a3.set_xlabel("CP ranks R (one 128K sequence)")
    a3.set_ylabel("peak GiB per rank")
    a3.set_title("memory per rank", fontsize=9)
    for ax in (a1, a2, a3):
        ax.set_xticks(rs)
        ax.legend(fontsize=7)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
    fig.suptitle("MDN op under CP, 4 H100s, NCCL, bf16, H=6 K=128 V=256 (session 9)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def plot_cp_model_weak(out):
    """Whole-model CP weak scaling, 16K tokens per GPU per micro-batch (session 9, plans cpm9
    and gm9): step time per layout, CP = 1 first."""
    runs = [("400M", [("CP = 1", "cp1_400m_16k"), ("CP = 2", "cp2_400m_32k"),
                      ("CP = 4", "cp4_400m_64k")]),
            ("1.3B (recompute; CP = 2 on another machine of the kind)", [("CP = 1", "cp1_1p3b_16k"), ("CP = 2, torch maps",
                                                               "cp2_1p3b_32k_default_a"),
                                  ("CP = 2, Triton maps", "cp2_1p3b_32k_gm")])]
    panels = [(title, [(lab, d) for lab, n in rows
                       if (d := _load(f"model_h100x4_mdn_{n}_v9.json"))]) for title, rows in runs]
    if not any(rows for _, rows in panels):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (title, rows) in zip(axes, panels):
        if not rows:
            continue
        base = rows[0][1]["step_ms_median"]
        ms = [d["step_ms_median"] for _, d in rows]
        ax.bar(range(len(rows)), ms, color=["gray"] + ["tab:blue"] * (len(rows) - 1))
        for i, m in enumerate(ms[1:], start=1):
            ax.text(i, m, f"eff. {base / m:.2f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(rows)), [lab for lab, _ in rows], fontsize=8)
        ax.set_ylabel("step, ms (16K tokens per GPU per micro-batch)")
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, max(ms) * 1.15)
    fig.suptitle("Whole-model CP weak scaling, H100s, bf16 (efficiency t(CP=1)/t(CP=R); goal 0.9)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def plot_session11(out):
    """Session 11 (H200s): the 1.3B 4K step's norm A/B and its peers; the 400M CP = 2 step with
    the eager and FLA's CP conv; whole-model CP weak-scaling efficiency against session 9's."""
    def ms(name):
        d = _load(name)
        return d["step_ms_median"] if d else None

    peers = [("MDN\neager norm", "model_h200_mdn_1p3b_4k_eager_norm_v11.json"),
             ("MDN\nTriton norm", "model_h200_mdn_1p3b_4k_triton_norm_v11.json"),
             ("MDN\n(call 2)", "model_h200_mdn_1p3b_4k_v11.json"),
             ("GDN mode", "model_h200_gdn_1p3b_4k_v11.json"),
             ("Megatron-core\nGDN", "model_h200_megatron_gdn_1p3b_4k_v11.json"),
             ("Transformer", "model_h200_transformer_1p3b_4k_v11.json")]
    peers = [(lab, d) for lab, n in peers if (d := _load(n))]
    conv = [(lab, ms(n)) for lab, n in (("CP = 1, 16K", "model_h200_mdn_cp1_400m_16k_v11.json"),
                                        ("CP = 2, eager conv", "model_h200x2_mdn_cp2_400m_32k_eager_conv_v11.json"),
                                        ("CP = 2, FLA conv", "model_h200x2_mdn_cp2_400m_32k_fla_conv_v11.json"))]
    conv = [(lab, m) for lab, m in conv if m]
    eff = {}
    for key, files in (("400M, session 9 (H100)", ["model_h100x4_mdn_cp1_400m_16k_v9.json",
                                                    "model_h100x4_mdn_cp2_400m_32k_v9.json",
                                                    "model_h100x4_mdn_cp4_400m_64k_v9.json"]),
                       ("400M, session 11 (H200)", ["model_h200x4_mdn_cp1_400m_16k_v11.json",
                                                     "model_h200x4_mdn_cp2_400m_32k_v11.json",
                                                     "model_h200x4_mdn_cp4_400m_64k_v11.json"]),
                       ("1.3B, session 11 (H200)", ["model_h200x4_mdn_cp1_1p3b_16k_v11.json", None,
                                                     "model_h200x4_mdn_cp4_1p3b_64k_v11.json"])):
        t = [ms(f) if f else None for f in files]
        if t[0]:
            eff[key] = [(r, t[0] / x) for r, x in zip((1, 2, 4), t) if x]
    # the 1.3B CP = 2 ran on a 2-GPU machine beside its own CP = 1 (plan s11b)
    c1, c2 = ms("model_h200_mdn_cp1_1p3b_16k_v11.json"), ms("model_h200x2_mdn_cp2_1p3b_32k_v11.json")
    if c1 and c2 and "1.3B, session 11 (H200)" in eff:
        eff["1.3B, session 11 (H200)"].insert(1, (2, c1 / c2))
    if not (peers or conv or eff):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15.5, 3.8))
    ax = axes[0]
    if peers:
        tps = [d["tokens_per_s_per_gpu"] for _, d in peers]
        ax.bar(range(len(peers)), tps, color=["gray", "tab:blue", "tab:blue", "tab:orange", "tab:green",
                                              "tab:red"][:len(peers)])
        for i, (_, d) in enumerate(peers):
            ax.text(i, tps[i], f"{d['step_ms_median']:.0f} ms\nMFU {100 * d['mfu']:.1f}%", ha="center",
                    va="bottom", fontsize=7)
        ax.set_xticks(range(len(peers)), [lab for lab, _ in peers], fontsize=7)
        ax.set_ylim(0, max(tps) * 1.25)
        ax.set_ylabel("tokens/s per GPU")
        ax.set_title("1.3B, 2 micro-batches of 2 × 4096, one H200", fontsize=9)
    ax = axes[1]
    if conv:
        ax.bar(range(len(conv)), [m for _, m in conv], color=["gray", "tab:orange", "tab:blue"][:len(conv)])
        for i, (_, m) in enumerate(conv):
            ax.text(i, m, f"{m:.0f} ms" + (f"\neff. {conv[0][1] / m:.2f}" if i else ""), ha="center",
                    va="bottom", fontsize=8)
        ax.set_xticks(range(len(conv)), [lab for lab, _ in conv], fontsize=8)
        ax.set_ylim(0, max(m for _, m in conv) * 1.25)
        ax.set_ylabel("step, ms (16K tokens per GPU per micro-batch)")
        ax.set_title("400M, the conv under CP (2 H200s)", fontsize=9)
    ax = axes[2]
    for key, pts in eff.items():
        ax.plot([r for r, _ in pts], [e for _, e in pts], marker="o", label=key,
                linestyle="--" if "session 9" in key else "-")
    ax.axhline(0.9, color="k", linewidth=0.8, linestyle=":", label="goal 0.9")
    ax.set_xticks([1, 2, 4])
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("CP ranks (16K tokens per GPU per micro-batch)")
    _finish(fig, ax, out, "efficiency t(CP=1) / t(CP=R)", "whole-model CP weak scaling")
    return out


def plot_in_proj_alignment(out):
    """Session 13 (one H200): the step with the in-projection padded to a multiple of 8 rows
    (model.in_proj_row_multiple: 8, the default) and without (1), 1.3B and 400M, beside MDN."""
    groups = [("1.3B (2 × 2 × 4096)", [("GDN mode\nunpadded", "model_h200_gdn_1p3b_4k_unpadded_v13.json"),
                                       ("GDN mode\npadded", "model_h200_gdn_1p3b_4k_v13.json"),
                                       ("MDN", "model_h200_mdn_1p3b_4k_v13.json"),
                                       ("Megatron-core\nGDN", "model_h200_megatron_gdn_1p3b_4k_v13.json")]),
              ("400M (4 × 4096)", [("GDN mode\nunpadded", "model_h200_gdn_400m_4k_unpadded_v13.json"),
                                   ("GDN mode\npadded", "model_h200_gdn_400m_4k_v13.json"),
                                   ("MDN", "model_h200_mdn_400m_4k_v13.json")])]
    groups = [(t, [(lab, d) for lab, n in bars if (d := _load(n))]) for t, bars in groups]
    groups = [(t, bars) for t, bars in groups if bars]
    if not groups:
        return None
    colors = {"GDN mode\nunpadded": "gray", "GDN mode\npadded": "tab:orange", "MDN": "tab:blue",
              "Megatron-core\nGDN": "tab:green"}
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 3.8), squeeze=False)
    for ax, (title, bars) in zip(axes[0], groups):
        tps = [d["tokens_per_s_per_gpu"] for _, d in bars]
        ax.bar(range(len(bars)), tps, color=[colors[lab] for lab, _ in bars])
        for i, (_, d) in enumerate(bars):
            ax.text(i, tps[i], f"{d['step_ms_median']:.0f} ms\nMFU {100 * d['mfu']:.1f}%",
                    ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(bars)), [lab for lab, _ in bars], fontsize=7)
        ax.set_ylim(0, max(tps) * 1.25)
        ax.set_ylabel("tokens/s per GPU")
        ax.set_title(f"{title}, one H200: in-projection rows padded to 8", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def plot_memory_estimate(out):
    """Estimated against measured peak memory of the trainer (tests/gpu/test_longctx_memory_gpu)."""
    rows = []
    # session 2's runs, then session 5's after the op stopped keeping U on ctx (s5)
    for name, tag in (("longctx_memory_h100_1gpu.json", ""), ("longctx_memory_h100_1gpu_400m_64k.json", ""),
                      ("longctx_memory_h100_1gpu_400m_64k_v4_u_fix.json", " s5"),
                      ("longctx_memory_h100_1gpu_1p3b_64k.json", " s5")):
        d = _load(name)
        if not d:
            continue
        for r in (d["results"].values() if "results" in d else [d]):
            if r.get("measured_peak_gib") is None:
                continue
            model = os.path.basename(r["model"]).replace("mdn_", "").replace(".yaml", "")
            rows.append((f"{model}\n{r['seq_len'] // 1024}K{tag}", r["estimate_allocated_gib"],
                         r["measured_peak_gib"], r["error"]))
    # session 9's longest-context search (the fitting rungs, 1, 2 and 4 GPUs, CP = GPUs)
    for g in (1, 2, 4):
        for r in _load(f"longctx_search_h100x4_v9_g{g}.json") or []:
            if r.get("measured_peak_gib") is not None and not r.get("skipped_steps"):
                rows.append((f"1.3b {g} GPU\n{r['seq_len'] // 1024}K s9", r["estimate_allocated_gib"],
                             r["measured_peak_gib"], r["error"]))
    if not rows:
        return None
    rows = sorted(set(rows))
    fig, ax = plt.subplots(figsize=(8, 3.8))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r[1] for r in rows], 0.4, label="estimate", color="tab:blue")
    ax.bar([x + 0.2 for x in xs], [r[2] for r in rows], 0.4, label="measured peak", color="gray")
    for x, r in zip(xs, rows):
        ax.text(x, max(r[1], r[2]), f"{100 * r[3]:+.1f}%", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), [r[0] for r in rows], fontsize=7)
    return _finish(fig, ax, out, "GiB per GPU",
                   "Memory estimate vs measured peak per GPU, H100, bf16 (target ±15%)")


# session 10: one GPU standing in for a CP rank (--emulate-cp) and real CP = 2 on 2 H200s
LONGCTX_V10 = [("512K/4 default\nH100, emulated", "longctx_emulate_h100_cp4_512k_default_v10.json", None),
               ("768K/4 lean\nH200, emulated", "longctx_emulate_h200_cp4_768k_lean_seg_v10.json", None),
               ("1M/4 lean\nH200, emulated", "longctx_emulate_h200_cp4_1m_lean_seg_v10.json", None),
               ("1M/4 lean+offload\nH200, emulated", "longctx_emulate_h200_cp4_1m_lean_seg_offload_v10.json", None),
               ("384K/2 lean\n2 H200s, real CP", "longctx_search_h200x2_v10_g2_lean.json", 393216),
               ("512K/2 lean\n2 H200s, real CP", "longctx_search_h200x2_v10_g2_lean.json", 524288)]


def _estimate_now(r):
    """The current estimator's figure for a recorded run (the run's own record keeps the estimate
    of its day): the layout, lean node, segments and offload it ran with; an emulating run holds
    the whole optimizer."""
    import yaml

    from mdn_scale.model import ModelConfig
    from mdn_scale.train.memory import GIB, Layout, estimate

    root = os.path.join(os.path.dirname(__file__), "..")
    sec = yaml.safe_load(open(os.path.join(root, r["model"])))["model"]
    cfg = ModelConfig.from_dict(dict(sec, loss_chunk_tokens=r["loss_chunk_tokens"]))
    env = r.get("env_cp") or r.get("env") or {}   # env_cp: session 10's first records
    R = r.get("emulate_cp") or r["cp"]
    lay = Layout(tp=r["tp"], cp=R, seq_len=r["seq_len"], recompute=r["recompute"],
                 recompute_offload=bool(r.get("recompute_offload")),
                 distributed_optimizer=r["distributed_optimizer"] and not r.get("emulate_cp"),
                 fused_mixer=True, fused_gates=True, cp_lean=env.get("MDN_CP_LEAN") == "1",
                 # records before session 11 ran the eager block norm and do not say so
                 triton_norm=r.get("norm_kernel", "eager") == "triton",
                 # records before session 23 ran the eager SwiGLU and do not say so
                 compiled_mlp=r.get("mlp_kernel", "eager") == "compiled",
                 cp_lean_segment_tokens=int(env.get("MDN_CP_LEAN_SEGMENT_TOKENS", 0)))
    # the op's q̂, k̂ and v as the run kept them: runs before session 15 (no MDN_RAW_QK in their
    # record) kept the fp32 chunks and a copy of v, which the estimator reads from the environment
    saved = os.environ.get("MDN_RAW_QK")
    os.environ["MDN_RAW_QK"] = env.get("MDN_RAW_QK", "0")
    try:
        return estimate(cfg, lay)["allocated"] / GIB
    finally:
        if saved is None:
            del os.environ["MDN_RAW_QK"]
        else:
            os.environ["MDN_RAW_QK"] = saved


def plot_longctx_v10(out):
    """Session 10: measured peak per rank against the current estimate, and the projected peak
    of the real CP rank an emulating GPU stands in for; the H100's 79.1 GiB as a line."""
    rows = []
    for label, name, seq in LONGCTX_V10:
        d = _load(name)
        recs = [x for x in d if x["seq_len"] == seq] if isinstance(d, list) else [d] if d else []
        for r in recs:
            if r.get("measured_peak_gib") is None:
                continue
            rows.append((label, _estimate_now(r), r["measured_peak_gib"],
                         r.get("projected_rank_peak_gib", r["measured_peak_gib"])))
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(9, 4))
    xs = range(len(rows))
    ax.bar([x - 0.27 for x in xs], [r[1] for r in rows], 0.27, label="estimate (this run)", color="tab:blue")
    ax.bar(list(xs), [r[2] for r in rows], 0.27, label="measured peak", color="gray")
    ax.bar([x + 0.27 for x in xs], [r[3] for r in rows], 0.27, label="projected real CP rank", color="tab:green")
    ax.axhline(79.1, color="tab:red", lw=1, ls="--", label="H100 (79.1 GiB)")
    for x, r in zip(xs, rows):
        ax.text(x, max(r[1], r[2]) + 1, f"{100 * (r[1] - r[2]) / r[2]:+.1f}%", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), [r[0] for r in rows], fontsize=7)
    return _finish(fig, ax, out, "GiB per GPU (allocated)",
                   "1.3B long context per CP rank, bf16, recompute, ZeRO-1 (session 10)")


def plot_deepspeed(out):
    """DeepSpeed ZeRO against the Megatron backend, 1.3B: tokens/s per GPU and GPU / host peaks."""
    cases = {}
    # later files win for a case measured twice (the 2-GPU Megatron case was rerun with both
    # 2-GPU DeepSpeed cases after the out-projection fix: deepspeed_1p3b_h100_2gpu_v2.json)
    for name in ("deepspeed_1p3b_h100_1gpu.json", "deepspeed_1p3b_h100_2gpu.json",
                 "deepspeed_1p3b_h100_2gpu_v2.json", "deepspeed_1p3b_h100_4gpu.json"):
        d = _load(name)
        for case, r in (d or {}).get("results", {}).items():
            if r.get("rc") == 0 and r.get("tokens_per_s_per_gpu"):
                cases[case] = r
    if not cases:
        return None
    names = sorted(cases, key=lambda c: (cases[c]["gpus"], c))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.5))
    a1.bar(names, [cases[c]["tokens_per_s_per_gpu"] for c in names], color="tab:blue")
    a1.set_ylabel("tokens/s per GPU")
    xs = range(len(names))
    a2.bar([x - 0.2 for x in xs], [cases[c]["torch_peak_allocated_gb_rank0"] for c in names], 0.4,
           label="GPU (allocated)", color="tab:green")
    a2.bar([x + 0.2 for x in xs], [cases[c]["host_rss_peak_gb_rank0"] for c in names], 0.4,
           label="host RSS", color="gray")
    a2.set_xticks(list(xs), names)
    a2.set_ylabel("GB, rank 0")
    a2.legend(fontsize=7)
    for ax in (a1, a2):
        ax.tick_params(axis="x", labelsize=7, rotation=20)
    fig.suptitle("1.3B MDN, bf16, 4096 tokens, global batch 8, H100", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


# (label, file) of the whole-model runs (tools/bench_model.py), one H100 each, in the order shown
MODEL_RUNS = [
    ("MDN 400M\nsession 2", "model_h100_mdn_400m.json"),
    ("GDN 400M\nsession 2", "model_h100_gdn_400m.json"),
    ("MDN 400M", "model_h100_mdn_400m_v3.json"),
    ("GDN 400M", "model_h100_gdn_400m_v2.json"),
    ("Transformer\n400M", "model_h100_transformer_400m.json"),
    ("MDN 1.3B", "model_h100_mdn_1p3b.json"),
    ("GDN 1.3B", "model_h100_gdn_1p3b.json"),
    ("MDN 400M, eager gates\nsession 4 (A)", "model_h100_mdn_400m_v4_before_eager_gates_foreach.json"),
    ("MDN 400M, fused gates\n+ AdamW, session 4 (B)", "model_h100_mdn_400m_v4_fused_gates_adamw.json"),
    ("Megatron GDN\n400M (FLA)", "model_h100_megatron_gdn_400m.json"),
    ("MDN 1.3B\nsession 7", "model_h100_mdn_1p3b_v7.json"),
    ("GDN 1.3B\nsession 7", "model_h100_gdn_1p3b_v7.json"),
    ("MDN 400M, tuned\nlaunches, session 8", "model_h100_mdn_400m_tuned_v8.json"),
    ("MDN 1.3B, tuned\nlaunches, session 8", "model_h100_mdn_1p3b_tuned_v8.json"),
    ("MDN 1.3B\nsession 8 (z2)", "model_h100_mdn_1p3b_v8_z2.json"),
    ("GDN 1.3B\nsession 8 (z2)", "model_h100_gdn_1p3b_v8_z2.json"),
    ("Megatron GDN 1.3B\n(FLA) session 8 (z2)", "model_h100_megatron_gdn_1p3b_v8_z2.json"),
    ("MDN 1.3B\nsession 9 (cp8)", "model_h100_mdn_1p3b_v9_cp8.json"),
    ("Transformer 1.3B\nsession 9 (cp8)", "model_h100_transformer_1p3b_v9_cp8.json"),
]


def plot_model(out):
    """Whole-model training throughput (tokens/s per GPU) and MFU per recorded run."""
    rows = []
    for label, name in MODEL_RUNS:
        d = _load(name)
        if d and d.get("tokens_per_s_per_gpu"):
            rows.append((label, d["tokens_per_s_per_gpu"], 100 * d["mfu"]))
    if not rows:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    xs = range(len(rows))
    colors = ["lightgray" if "session 2" in r[0] else "tab:blue" for r in rows]
    a1.bar(xs, [r[1] for r in rows], color=colors)
    a1.set_ylabel("tokens/s per GPU")
    a2.bar(xs, [r[2] for r in rows], color=colors)
    a2.set_ylabel("MFU, %")
    for ax in (a1, a2):
        ax.set_xticks(list(xs), [r[0].replace("\n", " ") for r in rows], rotation=30, ha="right")
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("Whole-model training step, one H100, bf16, 16K tokens per step "
                 "(gray: before the out-projection and fused-mixer fixes)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def plot_cp_wgmma(out):
    """Session 7: the 400M trainer step at CP = 2 on a wrong machine with every kernel on wgmma
    (MDN_NO_WGMMA=none) and with the default (state_bwd, group_map without it), and CP = 4."""
    d = _load("cp_wgmma_h100x4.json")
    if not d:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for plan, step, label, style in (
            ("suite_w", "cp2_400m_2l_none", "CP = 2, MDN_NO_WGMMA=none", "r-o"),
            ("suite_w", "cp2_400m_2l_default", "CP = 2, default (same machine)", "b-o"),
            ("suite_w", "cp4_400m_16k", "CP = 4 at 16K, default", "g-s"),
            ("probe", "cp2_400m_2l", "CP = 2, as is (probe machine)", "m--^")):
        run = next((r for k, r in d["runs"].items() if k.startswith(plan)), None)
        norms = (run or {}).get("steps", {}).get(step, {}).get("grad_norms")
        if norms:
            ax.semilogy(range(1, len(norms) + 1), norms, style, label=label)
    ax.set_xlabel("step")
    return _finish(fig, ax, out, "grad norm (log)",
                   "400M MDN trainer step on wrong H100 machines, bf16 (session 7)")


def plot_cp_model(out):
    """Grad norms of the trainer's step at CP = 1 and CP = 2 (2 layers, 2 x 8192 tokens) on the
    machines where 16-bit CP was wrong (plans p, t) and right (r, s): the same paths fail or hold
    by machine (cp_model_h100x4.json, sessions 5 and 6)."""
    d = _load("cp_model_h100x4.json")
    if not d:
        return None
    runs = [("CP = 1 (p)", "p", "bench_cp1_{}_2l", "black", "-"),
            ("CP = 2 fused chunk-local, wrong machine (p)", "p", "bench_cp2_{}_2l", "tab:red", "-"),
            ("CP = 2 fused chunk-local, wrong machine (t)", "t", "bench_cp2_{}_2l_fused_local_on",
             "tab:red", "--"),
            ("CP = 2 torch chunk-local, wrong machine (t)", "t", "bench_cp2_{}_2l", "tab:orange", "--"),
            ("CP = 2 torch op, wrong machine (p)", "p", "bench_cp2_torch_{}_2l", "tab:green", "--"),
            ("CP = 2 torch chunk-local, right machine (r)", "r", "bench_cp2_{}_2l_fused_local_off",
             "tab:blue", ":"),
            ("CP = 2 fused chunk-local, right machine (s)", "s", "bench_cp2_{}_2l_fused_local_on",
             "tab:purple", ":")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, model in zip(axes, ("400m", "1p3b")):
        for label, plan, job, color, ls in runs:
            rec = d["plans"].get(plan, {}).get("jobs", {}).get(job.format(model))
            if not rec or not rec.get("grad_norms"):
                continue
            g = rec["grad_norms"]
            steps = range(1, len(g) + 1)
            finite = [x if x == x else None for x in g]
            if all(x is None for x in finite):
                ax.plot([], [], color=color, ls=ls, label=label + ": NaN at every step")
                continue
            ax.plot(steps, [x if x is not None else float("nan") for x in finite], color=color,
                    ls=ls, marker="o", ms=3, label=label)
        ax.set_yscale("log")
        ax.set_xlabel("timed step")
        ax.set_ylabel("grad norm")
        ax.set_title(("400M" if model == "400m" else "1.3B") + " mixer, 2 layers", fontsize=9)
        ax.legend(fontsize=6)
    fig.suptitle("Trainer step under CP on 2 H100s against CP = 1 (bf16), by lent machine", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


# the op's kernels before (plan y's defaults) and after launch.TUNED (plan z's), per head size
TUNING_RUNS = {128: ("tune_kernels_h100_v1_k128_a.json", "tune_kernels_h100_v2_k128_v5.json"),
               256: ("tune_kernels_h100_v1_k256_a.json", "tune_kernels_h100_v2_k256_v5.json")}


def plot_kernel_tuning(out):
    """Device time per forward+backward of each of the op's kernels (torch.profiler, variant 0
    of tools/tune_kernels_gpu.py runs): session 7's launch parameters against launch.TUNED."""
    panels = []
    for K, (before, after) in TUNING_RUNS.items():
        b, a = _load(before), _load(after)
        if not (b and a):
            continue
        tb = next(v for v in b["variants"] if v["index"] == 0)["kernel_ms"]
        ta = next(v for v in a["variants"] if v["index"] == 0)["kernel_ms"]
        panels.append((K, tb, ta))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6))
    axes = axes if len(panels) > 1 else [axes]
    for ax, (K, tb, ta) in zip(axes, panels):
        names = sorted(tb, key=lambda n: -tb[n])
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [tb[n] for n in names], 0.4,
               label=f"session 7 launches: {sum(tb.values()):.2f} ms")
        ax.bar([i + 0.2 for i in x], [ta.get(n, 0) for n in names], 0.4,
               label=f"launch.TUNED: {sum(ta.values()):.2f} ms")
        ax.set_xticks(list(x), names, rotation=35, ha="right", fontsize=7)
        ax.set_ylabel("ms per forward+backward")
        ax.set_title(f"K={K}, V={2 * K}, B=8 T=4096 H=6, bf16, one H100", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


# PP = 1, 2, 4 (interleaved) of the same 24-layer 400M step, 8 micro-batches of 1 x 4096 (plan x)
PP_RUNS = [("PP=1 (1 GPU)", "model_h100x4_mdn_400m_24l_mb1x8_pp1_v8.json"),
           ("PP=2 1F1B", "model_h100x4_mdn_400m_24l_pp2_1f1b_v8.json"),
           ("PP=4 interleaved\n(2 chunks per stage)", "model_h100x4_mdn_400m_24l_pp4_vp2_v8.json")]


def plot_pp(out):
    rows = [(label, _load(name)) for label, name in PP_RUNS]
    rows = [(label, d) for label, d in rows if d]
    if not rows:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    xs = range(len(rows))
    a1.bar(xs, [d["step_ms_median"] for _, d in rows])
    a1.set_ylabel("step, ms (32K tokens)")
    for label, d in rows:
        a2.plot(range(1, len(d["losses"]) + 1), d["losses"], marker="o", label=label.replace("\n", " "))
    a2.set_xlabel("timed step")
    a2.set_ylabel("loss")
    a2.legend(fontsize=7)
    a1.set_xticks(list(xs), [label for label, _ in rows], fontsize=7)
    fig.suptitle("400M MDN, 24 layers, bf16, 4-H100 machine: pipeline parallel against one GPU "
                 "(the losses coincide)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


# Session 17, two H200s: the 1.3B step at 4K tokens per GPU (2 micro-batches of 2 x 4096 per
# rank) under each layout, three models; PP = 1 / 2 at 24 layers (plans s17x2, s17x2b, s17x2c)
LAYOUTS_V17 = [("1 GPU", "1p3b_4k"), ("DP = 2", "1p3b_4k_dp2"), ("TP = 2 + SP", "1p3b_4k_tp2_sp"),
               ("CP = 2", "1p3b_8k_cp2")]
PP_V17 = [("PP = 1 (1 GPU)", "model_h200x2_mdn_1p3b_24l_pp1_v17.json"),
          ("PP = 2, 1F1B", "model_h200x2_mdn_1p3b_24l_pp2_1f1b_v17.json")]


def plot_layouts_v17(out):
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.27
    found = False
    for i, model in enumerate(("mdn", "gdn", "transformer")):
        xs, ys = [], []
        for j, (_, key) in enumerate(LAYOUTS_V17):
            d = _load(f"model_h200x2_{model}_{key}_v17.json")
            if d:
                xs.append(j + (i - 1) * width)
                ys.append(d["tokens_per_s_per_gpu"] / 1e3)
        if xs:
            found = True
            a1.bar(xs, ys, width, label={"mdn": "MDN", "gdn": "GDN mode (our op, mu = 0)",
                                         "transformer": "Transformer (SDPA)"}[model])
    if not found:
        plt.close(fig)
        return None
    a1.set_xticks(range(len(LAYOUTS_V17)), [label for label, _ in LAYOUTS_V17], fontsize=8)
    a1.set_ylabel("thousand tokens/s per GPU")
    a1.set_title("1.3B, 4K tokens per GPU per micro-batch (bars missing: not measured)", fontsize=8)
    a1.legend(fontsize=7)
    for label, name in PP_V17:
        d = _load(name)
        if d:
            a2.plot(range(1, len(d["losses"]) + 1), d["losses"], marker="o",
                    label=f"{label}: {d['step_ms_median']:.0f} ms")
    a2.set_xlabel("timed step")
    a2.set_ylabel("loss")
    a2.set_title("1.3B at 24 layers, 8 micro-batches of 2 x 4096: PP = 2 against one GPU", fontsize=8)
    a2.legend(fontsize=7)
    fig.suptitle("Session 17 on two H200s (bf16 autocast over fp32 weights). MDN's 1 GPU, DP and "
                 "CP bars come from another call (machine) than the rest: compare within a layout "
                 "with care", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


# Session 18 on one 4-H200 machine (plans s18x4a, s18x4b, s18x4d): whole-model CP weak scaling
# (16K tokens per GPU per micro-batch) in two calls, PP = 1 / 2 / 4 at 24 layers, DP = 4
CP_V18 = {"400M": ("cp1_400m_16k", "cp2_400m_32k", "cp4_400m_64k"),
          "1.3B": ("cp1_1p3b_16k", "cp2_1p3b_32k", "cp4_1p3b_64k")}
PP_V18 = [("PP = 1", "mdn_1p3b_24l_pp1"), ("PP = 2\ninterleaved", "mdn_1p3b_24l_pp2_interleaved"),
          ("PP = 4\n1F1B", "mdn_1p3b_24l_pp4_1f1b"), ("PP = 4\ninterleaved", "mdn_1p3b_24l_pp4_interleaved")]


def plot_session18(out):
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(14, 3.9))
    found = False
    for model, names in CP_V18.items():
        for suffix, call, style in (("v18", "call a: agreement every call", "--"),
                                    ("v18d", "call d: once per micro-batch (default)", "-")):
            ds = [_load(f"model_h200x4_mdn_{n}_{suffix}.json") for n in names]
            if not all(ds):
                continue
            found = True
            eff = [ds[0]["step_ms_median"] / d["step_ms_median"] for d in ds]
            a1.plot([1, 2, 4], eff, style, marker="o", label=f"{model}, {call}")
    once = _load("model_h200x4_mdn_cp4_400m_64k_agree_once_v18.json")
    base = _load("model_h200x4_mdn_cp1_400m_16k_v18.json")
    if once and base:
        a1.plot([4], [base["step_ms_median"] / once["step_ms_median"]], "*", markersize=10,
                label="400M, call a, MDN_CP_AGREE=once")
    a1.axhline(0.9, color="gray", lw=0.8, ls=":", label="goal 0.9")
    a1.set_xticks([1, 2, 4])
    a1.set_xlabel("CP ranks (one GPU each)")
    a1.set_ylabel("weak-scaling efficiency t(CP=1) / t(CP=R)")
    a1.set_ylim(0.5, 1.05)
    a1.set_title("CP weak scaling, 16K tokens per GPU per micro-batch", fontsize=8)
    a1.legend(fontsize=6)
    base = _load("model_h200x4_mdn_1p3b_24l_pp1_v18.json")
    if base:
        xs, ys, ideal = [], [], []
        for label, name in PP_V18:
            d = _load(f"model_h200x4_{name}_v18.json")
            if d:
                xs.append(label)
                ys.append(base["step_ms_median"] / d["step_ms_median"])
                ideal.append(d["world"])
        a2.bar(xs, ideal, color="lightgray", label="ideal (GPUs)")
        a2.bar(xs, ys, width=0.5, label="measured speedup over PP = 1")
        for x, y in zip(xs, ys):
            a2.text(x, y + 0.05, f"{y:.2f}x", ha="center", fontsize=7)
        a2.set_ylabel("speedup (losses equal to PP = 1 at every step)")
        a2.set_title("1.3B at 24 layers, 8 micro-batches of 2 x 4096", fontsize=8)
        a2.legend(fontsize=7)
    bars = [("MDN 1.3B", "mdn_1p3b_4k_v18", "mdn_1p3b_4k_dp4_v18"),
            ("GDN mode 1.3B", "gdn_1p3b_4k_v18", "gdn_1p3b_4k_dp4_v18"),
            ("MDN 400M", "mdn_400m_4k_v18d", "mdn_400m_4k_dp4_v18d")]
    for i, (label, one, four) in enumerate(bars):
        d1, d4 = _load(f"model_h200x4_{one}.json"), _load(f"model_h200x4_{four}.json")
        if d1 and d4:
            a3.bar([i - 0.2, i + 0.2], [d1["tokens_per_s_per_gpu"] / 1e3, d4["tokens_per_s_per_gpu"] / 1e3],
                   0.38, color=["tab:blue", "tab:orange"])
            a3.text(i + 0.2, d4["tokens_per_s_per_gpu"] / 1e3 + 1,
                    f"{d4['tokens_per_s_per_gpu'] / d1['tokens_per_s_per_gpu']:.2f}", ha="center", fontsize=7)
    a3.set_xticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    a3.set_ylabel("thousand tokens/s per GPU")
    a3.set_title("4K tokens per sequence: one GPU against DP = 4", fontsize=8)
    a3.legend(handles=[Patch(color="tab:blue", label="1 GPU"),
                       Patch(color="tab:orange", label="DP = 4 (per GPU; ratio above)")], fontsize=7)
    return _finish_panels(fig, out, found, "Session 18 on four H200s (bf16 autocast over fp32 "
                          "weights); within a panel the runs of one call compare, across calls "
                          "the machine differs")


def plot_session19(out):
    """Session 19 on two H200s: the 1.3B CP = 2 step's variants against CP = 1 (left), and the
    offsets' host syncs A/B against the tree before, every timed step shown (right: the noise
    is the point)."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 3.9))
    rows = [("full recompute", "cp1_1p3b_16k_v19", "cp2_1p3b_32k_v19b"),
            ("recompute,\nCP maps kept", "cp1_1p3b_16k_v19", "cp2_1p3b_32k_keep_maps_v19b"),
            ("no recompute", "cp1_1p3b_16k_norecompute_v19", "cp2_1p3b_32k_norecompute_v19")]
    found = False
    for i, (label, one, two) in enumerate(rows):
        d1, d2 = _load(f"model_h200x2_mdn_{one}.json"), _load(f"model_h200x2_mdn_{two}.json")
        if not (d1 and d2):
            continue
        found = True
        a1.bar([i - 0.2, i + 0.2], [d1["step_ms_median"], d2["step_ms_median"]], 0.38,
               color=["tab:blue", "tab:orange"])
        a1.text(i + 0.2, d2["step_ms_median"] + 15,
                f"eff {d1['step_ms_median'] / d2['step_ms_median']:.2f}", ha="center", fontsize=7)
    a1.set_xticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    a1.set_ylabel("step (ms, median)")
    a1.set_ylim(0, 1150)
    a1.set_title("1.3B, 16K tokens per GPU: CP = 1 against CP = 2", fontsize=8)
    a1.legend(handles=[Patch(color="tab:blue", label="CP = 1 (one GPU)"),
                       Patch(color="tab:orange", label="CP = 2 (weak-scaling efficiency above)")],
              fontsize=7, loc="upper right", ncol=2)
    pairs = [("400M CP=1\n16K (s19s)", "mdn_base_cp1_400m_16k_v19s",
              ["mdn_cp1_400m_16k_v19s", "mdn_cp1_400m_16k_again_v19s"]),
             ("400M CP=2\n32K (s19s)", "mdn_base_cp2_400m_32k_v19s",
              ["mdn_cp2_400m_32k_v19s"]),
             ("400M 4K\n(s19s2)", "base_mdn_400m_4k_v19s2", ["mdn_400m_4k_v19s2"]),
             ("400M 4K\n(s19s3)", "base_mdn_400m_4k_g0_v19s3",
              ["mdn_400m_4k_g0_v19s3", "mdn_400m_4k_g1_v19s3"]),
             ("1.3B 4K\n(s19s2)", "base_mdn_1p3b_4k_v19s2", ["mdn_1p3b_4k_v19s2"])]
    extra_base = {"400M CP=2\n32K (s19s)": "mdn_base_cp2_400m_32k_again_v19s",
                  "400M 4K\n(s19s3)": "base_mdn_400m_4k_g1_v19s3"}
    for i, (label, base, new) in enumerate(pairs):
        bases = [_load(f"model_h200x2_{n}.json") for n in [base, extra_base.get(label)] if n]
        news = [_load(f"model_h200x2_{n}.json") for n in new]
        ref = [b for b in bases if b]
        if not ref:
            continue
        found = True
        scale = 1.0 / ref[0]["step_ms_median"]
        for b in ref:
            a2.plot([i - 0.15] * len(b["step_ms"]), [t * scale for t in b["step_ms"]], "o",
                    color="tab:gray", ms=3)
        for n in news:
            if n:
                a2.plot([i + 0.15] * len(n["step_ms"]), [t * scale for t in n["step_ms"]], "o",
                        color="tab:green", ms=3)
    a2.axhline(1.0, color="gray", lw=0.8, ls=":")
    a2.set_xticks(range(len(pairs)), [p[0] for p in pairs], fontsize=7)
    a2.set_ylabel("step time / the tree before's median")
    a2.set_title("The offsets' host syncs gone: every timed step, before (gray) and after (green)",
                 fontsize=8)
    return _finish_panels(fig, out, found, "Session 19 on two H200s (bf16 autocast over fp32 weights)")


def plot_session20(out):
    """Session 20: the pairs re-made from the saved W with K split (_state_pairs_kernel). Left:
    its time per launch-block choice at four shapes, over the earlier structure's (one program
    over all K: "fwd"), both sweeps of one H200. Right: the 1.3B MFU-shape step, every timed
    step of the s20d A/B (crosswise on two H200s), the earlier structure (gray) and the split
    kernel (green)."""
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.2),
                                     gridspec_kw=dict(width_ratios=[1.7, 1, 1]))
    found = False
    rows = {}
    for name in ("state_pairs_h200_v20_sweep1.json", "state_pairs_h200_v20_sweep2.json"):
        d = _load(name)
        for r in (d or {}).get("rows", []):
            sh = r["shape"]
            key = f"B={sh['B']} T={sh['T'] // 1024}K K={sh['K']}"
            rows.setdefault(key, {})
            cfg = r["launch"] if r["config"] not in ("fwd", "default") else r["config"]
            if "ms" in r and cfg not in rows[key]:
                rows[key][cfg] = r["ms"]
    cfgs = [c for c in dict.fromkeys(c for v in rows.values() for c in v) if c not in ("fwd", "default")]
    width = 0.8 / max(1, len(cfgs))
    for i, (key, v) in enumerate(rows.items()):
        if "fwd" not in v:
            continue
        found = True
        for j, c in enumerate(cfgs):
            if c in v:
                a1.bar(i - 0.4 + (j + 0.5) * width, v[c] / v["fwd"], width,
                       color=plt.cm.tab20(j % 20), label=c if i == 0 else None)
    a1.axhline(1.0, color="gray", lw=0.8, ls=":")
    a1.set_xticks(range(len(rows)), list(rows), fontsize=8)
    a1.set_ylabel("time / one program over all K")
    a1.set_title("The pairs from the saved W: launch blocks (BK×BV, warps, stages)", fontsize=8)
    a1.legend(fontsize=6, ncol=3, loc="upper right")
    a1.set_ylim(0, 2.0)
    groups = [("earlier structure", "tab:gray", ["old_pairs_mdn_1p3b_4k", "old_pairs_mdn_1p3b_4k_b",
                                                 "old_pairs_mdn_1p3b_4k_b_again"]),
              ("K split (64×64)", "tab:green", ["mdn_1p3b_4k", "mdn_1p3b_4k_again", "mdn_1p3b_4k_b"])]
    for i, (label, color, names) in enumerate(groups):
        for k, n in enumerate(names):
            d = _load(f"model_h200x2_{n}_v20d.json")
            if d:
                found = True
                a2.plot([i + 0.1 * (k - 1)] * len(d["step_ms"]), d["step_ms"], "o", color=color, ms=3)
    a2.set_xticks(range(len(groups)), [g[0] for g in groups], fontsize=8)
    a2.set_xlim(-0.6, 1.6)
    a2.set_ylabel("step (ms)")
    a2.set_title("1.3B, 2 micro-batches of 2 × 4K (s20d): every timed step", fontsize=8)
    few = [("W-making pass\n4 warps", "tab:gray", ["few_off_cp1_1p3b_16k", "few_off_cp1_1p3b_16k_b"]),
           ("8 warps where few\nprograms (default)", "tab:green", ["cp1_1p3b_16k", "cp1_1p3b_16k_b"])]
    for i, (label, color, names) in enumerate(few):
        for k, n in enumerate(names):
            d = _load(f"model_h200x2_mdn_{n}_v20w.json")
            if d:
                found = True
                a3.plot([i + 0.1 * (2 * k - 1)] * len(d["step_ms"]), d["step_ms"], "o", color=color,
                        ms=3, label=f"GPU {k}" if i == 0 else None, marker="os"[k])
    a3.set_xticks(range(len(few)), [g[0] for g in few], fontsize=8)
    a3.set_xlim(-0.6, 1.6)
    a3.set_ylim(670, 720)   # one 4-warp step of 898.5 ms (GPU 1's first) lies above
    a3.text(-0.5, 717, "off scale: one 4-warp step at 898.5 ms", fontsize=6, va="top")
    a3.set_ylabel("step (ms)")
    a3.set_title("1.3B CP = 1, 16K, recompute (s20w): every timed step", fontsize=8)
    a3.legend(fontsize=7)
    return _finish_panels(fig, out, found, "Session 20 on H200s (bf16)")


def _variant_rows(names, variant: str) -> list:
    """Per shape of bench_kernels results `names`: (label, (memory, time) of the default and of
    `variant` against FLA's GDN), as _op_vs_gdn_bars takes them."""
    rows = []
    for name in names:
        for r in (_load(name) or {}).get("results", []):
            v = r.get(f"mdn[{variant}]", {}).get("ratios_vs_gdn")
            if "ratio_peak_mem" in r and v:
                sh = r["shape"]
                rows.append((f"B={sh['B']} T={sh['T'] // 1024}K K={sh['K']}",
                             (r["ratio_peak_mem"], v["peak_mem"]), (r["ratio_fwd_bwd"], v["fwd_bwd"])))
    return rows


def _op_vs_gdn_bars(ax, rows, names) -> bool:
    """Bars of MDN / FLA GDN peak memory and fwd+bwd time for two variants `names` per shape,
    rows = [(label, (mem_a, mem_b), (time_a, time_b))], issue 2's targets dotted."""
    a, b = names
    for i, (label, mem, tim) in enumerate(rows):
        ax.bar(i - 0.3, mem[0], 0.2, color="tab:gray", label=f"memory, {a}" if i == 0 else None)
        ax.bar(i - 0.1, mem[1], 0.2, color="tab:green", label=f"memory, {b}" if i == 0 else None)
        ax.bar(i + 0.1, tim[0], 0.2, color="silver", label=f"time, {a}" if i == 0 else None)
        ax.bar(i + 0.3, tim[1], 0.2, color="tab:olive", label=f"time, {b}" if i == 0 else None)
    ax.axhline(1.3, color="tab:green", lw=0.8, ls=":")
    ax.axhline(1.5, color="tab:olive", lw=0.8, ls=":")
    ax.set_xticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.set_ylabel("MDN / FLA GDN")
    ax.set_title("The op against FLA's GDN (targets: memory 1.3, time 1.5, dotted)", fontsize=8)
    ax.legend(fontsize=7, ncol=2)
    return bool(rows)


def _crosswise_steps(ax, groups) -> bool:
    """Every timed step of crosswise runs on two GPUs: groups = [(label, color, pattern)], the
    pattern's {} is "" for GPU 0's file and "_b" for GPU 1's (model_h200x2_<name>.json)."""
    found = False
    for i, (label, color, pattern) in enumerate(groups):
        for k, tag in enumerate(("", "_b")):
            d = _load(f"model_h200x2_{pattern.format(tag)}.json")
            if d:
                found = True
                ax.plot([i + 0.1 * (2 * k - 1)] * len(d["step_ms"]), d["step_ms"], "os"[k],
                        color=color, ms=3, label=f"GPU {k}" if i == 0 else None)
    ax.set_xticks(range(len(groups)), [g[0] for g in groups], fontsize=7)
    return found


def plot_session21(out):
    """Session 21: the op's backward in two segments (the default since). Left: MDN / FLA GDN
    peak memory and fwd+bwd time at the three bench shapes, one segment against two (plans
    s21k, s21l; the issue's targets dotted). Right: the 1.3B steps, every timed step, crosswise
    on two H200s: the MFU shape and one 16K sequence (segments cut it)."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw=dict(width_ratios=[1.4, 1]))
    found = False
    rows = _variant_rows(("kernels_h200_v21_bwd_segments2.json",
                          "kernels_h200_v21_bwd_segments_long.json"), "MDN_BWD_SEGMENTS=2")
    found = _op_vs_gdn_bars(a1, rows, ("1 segment", "2 segments")) or found
    groups = [("MFU shape\n1 segment", "tab:gray", "mdn_1p3b_4k_seg1{}_v21k"),
              ("MFU shape\n2 segments", "tab:green", "mdn_1p3b_4k_seg2{}_v21k"),
              ("16K, CP = 1\n1 segment", "tab:gray", "cp1_1p3b_16k_seg1{}_v21l"),
              ("16K, CP = 1\n2 segments", "tab:green", "cp1_1p3b_16k_seg2{}_v21l")]
    found = _crosswise_steps(a2, groups) or found
    a2.set_ylim(530, 720)   # GPU 0's second timed 16K step in 2 segments took 1036.7 ms
    a2.text(-0.4, 715, "off scale: one 16K step in 2 segments at 1036.7 ms (GPU 0)", fontsize=6,
            va="top")
    a2.set_ylabel("step (ms)")
    a2.set_title("1.3B steps, every timed step (crosswise on two H200s)", fontsize=8)
    a2.legend(fontsize=7)
    return _finish_panels(fig, out, found, "Session 21 on H200s (bf16): two backward segments")


def plot_session22(out):
    """Session 22: the state passes on factored operands (MDN_STATE_KFAC; the default at K > 128
    since). Left: MDN / FLA GDN peak memory and fwd+bwd time at the three bench shapes, the
    operands against the factors (plan s22n; the issue's targets dotted). Right: the 1.3B
    steps (K = 256), every timed step, crosswise on two H200s (plan s22m)."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw=dict(width_ratios=[1.4, 1]))
    found = False
    rows = _variant_rows(("kernels_h200_v22_kfac3.json",), "MDN_STATE_KFAC=1")
    found = _op_vs_gdn_bars(a1, rows, ("operands", "factors")) or found
    groups = [("MFU shape\noperands", "tab:gray", "mdn_1p3b_4k{}_v22m"),
              ("MFU shape\nfactors", "tab:green", "mdn_1p3b_4k_kfac{}_v22m"),
              ("16K, CP = 1\noperands", "tab:gray", "cp1_1p3b_16k{}_v22m"),
              ("16K, CP = 1\nfactors", "tab:green", "cp1_1p3b_16k_kfac{}_v22m")]
    found = _crosswise_steps(a2, groups) or found
    a2.set_ylabel("step (ms)")
    a2.set_title("1.3B steps (K = 256), every timed step (crosswise on two H200s)", fontsize=8)
    a2.legend(fontsize=7)
    return _finish_panels(fig, out, found, "Session 22 on H200s (bf16): the state passes on factors")


def plot_session23(out):
    """Session 23: the elementwise work around the 1.3B step's matmuls. Left: every timed step,
    crosswise on two H200s, per plan: the compiled SwiGLU (s23a), the fused weight-gradient
    accumulation's two GEMMs (s23b), the output correction's kernels (s23c), and all of them
    against session 22's settings (s23d, 10 steps). Right: the GPU-busy time per step of the
    profiled steps (session 22's profile, then after each change)."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw=dict(width_ratios=[2, 1]))
    groups = [("a: eager\nSwiGLU", "tab:gray", "mdn_1p3b_4k_eager{}_v23a"),
              ("a: compiled", "tab:green", "mdn_1p3b_4k{}_v23a"),
              ("b: unfused\nwgrad", "tab:gray", "mdn_1p3b_4k_unfused{}_v23b"),
              ("b: addmm", "tab:olive", "mdn_1p3b_4k{}_v23b"),
              ("b: mm_add", "tab:green", "mdn_1p3b_4k_mm_add{}_v23b"),
              ("c: eager\ncorrection", "tab:gray", "mdn_1p3b_4k_corr_eager{}_v23c"),
              ("c: fused", "tab:green", "mdn_1p3b_4k{}_v23c"),
              ("d: session 22\nsettings", "tab:gray", "mdn_1p3b_4k_s22{}_v23d"),
              ("d: session 23\ndefaults", "tab:blue", "mdn_1p3b_4k{}_v23d")]
    found = _crosswise_steps(a1, groups)
    a1.set_ylabel("step (ms)")
    a1.set_title("1.3B MFU-shape step (2 × 2 × 4K), every timed step, crosswise; plans s23a–d",
                 fontsize=8)
    a1.legend(fontsize=7)
    busy = [("session 22\n(s22q)", "model_h200x2_mdn_1p3b_4k_profile_v22q.json"),
            ("+ compiled\nSwiGLU (s23a)", "model_h200x2_mdn_1p3b_4k_sites_v23a.json"),
            ("+ split once,\nwgrad (s23b)", "model_h200x2_mdn_1p3b_4k_sites_v23b.json"),
            ("+ correction\n(s23c)", "model_h200x2_mdn_1p3b_4k_sites_v23c.json")]
    vals = [(label, _load(f)) for label, f in busy]
    vals = [(label, d["profile"]["gpu_busy_ms"]) for label, d in vals if d and d.get("profile")]
    if vals:
        found = True
        a2.bar(range(len(vals)), [v for _, v in vals], color="tab:blue")
        for i, (_, v) in enumerate(vals):
            a2.text(i, v + 3, f"{v:.0f}", ha="center", fontsize=7)
        a2.set_xticks(range(len(vals)), [label for label, _ in vals], fontsize=7)
        a2.set_ylim(400, 540)
        a2.set_ylabel("GPU busy per step (ms)")
        a2.set_title("profiled steps (s23b: fused wgrad with addmm)", fontsize=8)
    return _finish_panels(fig, out, found, "Session 23 on H200s (bf16): the elementwise work "
                          "around the 1.3B step's matmuls")


def plot_session24(out):
    """Session 24: the 1.3B step at 4K per sequence on two H200s. Left: every timed step of
    each configuration (two runs each, on the two GPUs of one machine, in opposite orders
    where the plan could): the MFU shape against 4 × 4K micro-batches (s24a), the blocked
    reverse pass (s24b), ptxas register caps (s24c), one backward segment (s24d). Right: MFU
    (median step) of MDN at each micro-batch layout beside the GDN mode and the Transformer,
    with the 40% goal."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.4), gridspec_kw=dict(width_ratios=[1.6, 1]))
    groups = [("a: 2 × 2 × 4K", "tab:gray", ("mdn_1p3b_4k_v24a", "mdn_1p3b_4k_b_v24a")),
              ("a: 4 × 4K", "tab:blue", ("mdn_1p3b_4k_mb4_v24a", "mdn_1p3b_4k_mb4_b_v24a")),
              ("b: 4 × 4K", "tab:blue", ("mdn_1p3b_4k_mb4_v24b",)),
              ("b: blocked\nreverse pass", "tab:red", ("mdn_1p3b_4k_mb4_blocked_v24b",
                                                        "mdn_1p3b_4k_mb4_blocked_b_v24b")),
              ("c: 4 × 4K", "tab:blue", ("mdn_1p3b_4k_mb4_v24c", "mdn_1p3b_4k_mb4_b_v24c")),
              ("c: register\ncaps", "tab:red", ("mdn_1p3b_4k_mb4_nreg_v24c",
                                                 "mdn_1p3b_4k_mb4_nreg_b_v24c",
                                                 "mdn_1p3b_4k_mb4_st168_v24c")),
              ("d: 4 × 4K", "tab:blue", ("mdn_1p3b_4k_mb4_v24d", "mdn_1p3b_4k_mb4_b_v24d")),
              ("d: 1 backward\nsegment", "tab:green", ("mdn_1p3b_4k_mb4_seg1_v24d",
                                                       "mdn_1p3b_4k_mb4_seg1_b_v24d"))]
    found = False
    for i, (label, color, names) in enumerate(groups):
        for k, name in enumerate(names):
            d = _load(f"model_h200x2_{name}.json")
            if d:
                found = True
                x = i + 0.12 * (k - (len(names) - 1) / 2)
                a1.plot([x] * len(d["step_ms"]), d["step_ms"], "os^"[k], color=color, ms=3)
    a1.set_xticks(range(len(groups)), [g[0] for g in groups], fontsize=7)
    a1.set_ylabel("step (ms), 16,384 tokens")
    a1.set_title("1.3B step, every timed step of each run; plans s24a–d (one machine each)",
                 fontsize=8)
    bars = [("MDN 2 × 2 × 4K", "tab:gray", ("mdn_1p3b_4k_v24a", "mdn_1p3b_4k_b_v24a")),
            ("MDN 4 × 4K", "tab:blue", ("mdn_1p3b_4k_mb4_v24d", "mdn_1p3b_4k_mb4_b_v24d")),
            ("MDN 4 × 4K,\n1 segment", "tab:green", ("mdn_1p3b_4k_mb4_seg1_v24d",
                                                     "mdn_1p3b_4k_mb4_seg1_b_v24d")),
            ("MDN 4 × (4 × 4K)", "tab:blue", ("mdn_1p3b_4k_mb4x4_v24a",)),
            ("MDN 4 × (4 × 4K),\n1 segment", "tab:green", ("mdn_1p3b_4k_mb4x4_seg1_v24d",)),
            ("GDN mode\n4 × 4K", "tab:orange", ("gdn_1p3b_4k_mb4_v24a",)),
            ("Transformer\n4 × 4K", "tab:purple", ("transformer_1p3b_4k_mb4_v24a",))]
    vals = []
    for label, color, names in bars:
        got = [d["mfu"] for d in (_load(f"model_h200x2_{n}.json") for n in names) if d]
        if got:
            vals.append((label, color, 100 * sum(got) / len(got)))
    if vals:
        found = True
        a2.bar(range(len(vals)), [v for *_, v in vals], color=[c for _, c, _ in vals])
        for i, (*_, v) in enumerate(vals):
            a2.text(i, v + 0.4, f"{v:.1f}", ha="center", fontsize=7)
        a2.axhline(40, ls=":", color="k", lw=1)
        a2.text(len(vals) - 0.5, 40.5, "goal 40%", ha="right", fontsize=7)
        a2.set_xticks(range(len(vals)), [label for label, *_ in vals], fontsize=6, rotation=30,
                      ha="right")
        a2.set_ylim(0, 45)
        a2.set_ylabel("MFU (%), H100 SXM dense bf16 peak")
        a2.set_title("1.3B at 4K per sequence: MFU by micro-batch layout (mean of runs)", fontsize=8)
    return _finish_panels(fig, out, found, "Session 24 on H200s (bf16): the 1.3B step at larger "
                          "micro-batches; what did not help")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out-dir", default=RESULTS)
    a = ap.parse_args()
    for fn, name in ((plot_kernels, "kernels_vs_gdn.png"), (plot_cp, "cp_weak_scaling.png"),
                     (plot_memory_estimate, "memory_estimate_vs_measured.png"),
                     (plot_deepspeed, "deepspeed_vs_megatron_1p3b.png"),
                     (plot_model, "model_throughput.png"), (plot_cp_model, "cp_model_grad_norms.png"),
                     (plot_cp_wgmma, "cp_wgmma_grad_norms.png"),
                     (plot_kernel_tuning, "kernel_tuning.png"), (plot_pp, "pp_scaling.png"),
                     (plot_cp_scaling, "cp_scaling_v8.png"),
                     (plot_cp_model_weak, "cp_model_weak_scaling.png"),
                     (plot_longctx_v10, "longctx_v10.png"),
                     (plot_session11, "session11_model.png"),
                     (plot_in_proj_alignment, "session13_in_proj_alignment.png"),
                     (plot_layouts_v17, "session17_two_gpu_layouts.png"),
                     (plot_session18, "session18_four_gpus.png"),
                     (plot_session19, "session19_two_gpus.png"),
                     (plot_session20, "session20_state_pairs.png"),
                     (plot_session21, "session21_bwd_segments.png"),
                     (plot_session22, "session22_state_factors.png"),
                     (plot_session23, "session23_elementwise.png"),
                     (plot_session24, "session24_micro_batches.png")):
        path = fn(os.path.join(a.out_dir, name))
        print("wrote" if path else "skipped (no results)", name)


if __name__ == "__main__":
    main()
