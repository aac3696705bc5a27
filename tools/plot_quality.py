"""The quality run's result: validation loss against tokens of several training runs, a JSON
record, a PNG and a markdown table.

    python tools/plot_quality.py RUN_DIR... --out benchmarks/results/quality_h100 [--suite suite.json]

Each RUN_DIR is a run's logging.dir: `config.yaml` (the resolved config the trainer writes) and
`metrics.jsonl` (its validation lines `{"step", "val_loss"}`, training lines with `tokens` and
`tokens_per_s`). Writes OUT.json (card, versions, command, date; per run: final validation loss,
tokens seen, parameters, tokens/s, the validation curve), OUT.png (validation loss against tokens
seen, one line per run; skipped with a message where matplotlib is missing) and OUT.md (the
table). With byte tokens (vocab 257) the table also gives bits per byte: the loss / ln 2, the
end-of-document token counting as one byte.

A run cut short (its last validation before train.steps) is marked `complete: false`; the table
then also compares every run at the largest step all of them reached. `--suite` reads
benchmarks/suite.py's suite.json for each run's command, exit status and wall time (the job name
is the run folder's name).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LABELS = {"mdn": "MDN", "gdn": "GDN mode (MDN, momentum off)", "transformer": "Transformer"}


def read_run(run_dir: str) -> dict:
    import yaml

    cfg_path, met_path = os.path.join(run_dir, "config.yaml"), os.path.join(run_dir, "metrics.jsonl")
    for p in (cfg_path, met_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{run_dir}: no {os.path.basename(p)} (not a run's logging.dir?)")
    with open(cfg_path) as f:
        cfg = yaml.safe_load(f)
    train, val = [], []
    with open(met_path) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("val_loss") is not None:
                val.append(r)
            elif r.get("loss") is not None or "tokens" in r:
                train.append(r)
    t = cfg["train"]
    tokens_per_step = t["global_batch"] * t["seq_len"]
    curve = [{"step": r["step"], "tokens": r["step"] * tokens_per_step, "val_loss": r["val_loss"]} for r in val]
    # throughput: the median logged window (the first holds start-up and compilation; windows
    # after a validation hold its time)
    tps = [r["tokens_per_s"] for r in train[1:] if r.get("tokens_per_s")] or \
          [r["tokens_per_s"] for r in train if r.get("tokens_per_s")]
    from mdn_scale.model import ModelConfig, stats

    s = stats.model_stats(ModelConfig.from_dict(cfg["model"]), t["seq_len"], 1)
    last_step = max([r["step"] for r in train] + [r["step"] for r in val] + [0])
    return {
        "run_dir": run_dir, "name": os.path.basename(os.path.normpath(run_dir)),
        "mixer": cfg["model"]["mixer"], "label": LABELS.get(cfg["model"]["mixer"], cfg["model"]["mixer"]),
        "params": s["params_total"], "params_non_embedding": s["params_non_embedding"],
        "layers": cfg["model"]["num_layers"], "hidden_size": cfg["model"]["hidden_size"],
        "vocab_size": cfg["model"]["vocab_size"],
        "steps_planned": t["steps"], "steps_done": last_step, "tokens_per_step": tokens_per_step,
        "tokens_seen": last_step * tokens_per_step,
        "complete": bool(curve) and curve[-1]["step"] >= t["steps"],
        "final_val_loss": curve[-1]["val_loss"] if curve else None,
        "final_train_loss": train[-1].get("loss") if train else None,
        "tokens_per_s": statistics.median(tps) if tps else None,
        "peak_memory_gib": max((r.get("memory_gb", 0) for r in train), default=None),
        "val_curve": curve,
        "config": {k: cfg.get(k) for k in ("seed", "train", "model", "data", "eval")},
    }


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "triton", "megatron.core", "fla"):
        try:
            out[mod.replace(".", "_")] = getattr(__import__(mod, fromlist=["__version__"]), "__version__", "?")
        except Exception as e:  # noqa: BLE001 - a missing or broken package is a fact to record
            out[mod.replace(".", "_")] = f"not importable ({type(e).__name__})"
    return out


def card() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except Exception:  # noqa: BLE001
        pass
    return "cpu"


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def common_step(runs: list[dict]) -> int | None:
    """The largest validation step every run logged (None if some run logged none)."""
    steps = [{p["step"] for p in r["val_curve"]} for r in runs]
    if not all(steps):
        return None
    both = set.intersection(*steps)
    return max(both) if both else None


def _tokens(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def table(runs: list[dict], at_step: int | None) -> str:
    bpb = all(r["vocab_size"] == 257 for r in runs)
    cut = not all(r["complete"] for r in runs)
    head = ["model", "params", "layers × d", "tokens seen", "final val loss"]
    head += ["bits/byte"] if bpb else []
    head += [f"val loss at step {at_step}"] if cut and at_step else []
    head += ["tokens/s (median)", "peak mem"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        v = r["final_val_loss"]
        row = [r["label"] + ("" if r["complete"] else " (cut short)"), f"{r['params'] / 1e6:.1f}M",
               f"{r['layers']} × {r['hidden_size']}", _tokens(r["tokens_seen"]),
               "—" if v is None else f"{v:.4f}"]
        row += (["—" if v is None else f"{v / math.log(2):.3f}"] if bpb else [])
        if cut and at_step:
            at = next(p["val_loss"] for p in r["val_curve"] if p["step"] == at_step)
            row.append(f"{at:.4f}")
        row += ["—" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:,.0f}",
                "—" if not r["peak_memory_gib"] else f"{r['peak_memory_gib']:.1f} GiB"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: str, title: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_quality: matplotlib is not installed: no PNG (the JSON holds the curves)", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        if r["val_curve"]:
            ax.plot([p["tokens"] / 1e6 for p in r["val_curve"]], [p["val_loss"] for p in r["val_curve"]],
                    "o-", ms=3, label=f"{r['label']}, {r['params'] / 1e6:.1f}M")
    ax.set(xlabel="tokens seen (M)", ylabel="validation loss (nats/token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run logging dirs (config.yaml + metrics.jsonl)")
    ap.add_argument("--out", required=True, help="output prefix: OUT.json, OUT.png, OUT.md")
    ap.add_argument("--card", help="the card the runs trained on, when plotting elsewhere (default: "
                    "this machine's; 'card' and 'versions' then describe the plotting machine)")
    ap.add_argument("--suite", help="benchmarks/suite.py's suite.json: commands, status, wall time per job")
    ap.add_argument("--title", default="Validation loss, same tokens (held-out documents)")
    a = ap.parse_args(argv)
    runs = []
    for d in a.runs:
        try:
            runs.append(read_run(d))
        except (FileNotFoundError, KeyError, ValueError) as e:
            print(f"plot_quality: skipping {d}: {e}", file=sys.stderr)
    if not runs:
        print("plot_quality: error: no readable run", file=sys.stderr)
        return 2
    if a.suite and os.path.isfile(a.suite):
        with open(a.suite) as f:
            jobs = {j["job"]: j for j in json.load(f).get("jobs", [])}
        for r in runs:
            j = jobs.get(r["name"])
            if j:
                r.update(command=j.get("command"), job_status=j.get("status"), wall_s=j.get("wall_s"),
                         gpus=j.get("gpus"))
    at = common_step(runs)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    md = table(runs, at)
    png = plot(runs, a.out + ".png", a.title)
    first = runs[0]["config"]
    rec = {
        "benchmark": "quality: validation loss of same-size models on the same tokens (issue 9)",
        "card": a.card or card(), "versions": versions(), "git_commit": git_commit(),
        "versions_of": "the plotting machine" if a.card else "this machine (where the runs were plotted)",
        "command": " ".join([os.path.basename(sys.argv[0])] + (sys.argv[1:] if argv is None else list(argv))),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "data": first.get("data"), "train": first.get("train"), "seed": first.get("seed"),
        "same_tokens": len({json.dumps([r["config"]["data"], r["config"]["seed"], r["config"]["train"]],
                                       sort_keys=True) for r in runs}) == 1,
        "common_val_step": at, "png": png and os.path.basename(png), "table_md": md,
        "runs": [{k: v for k, v in r.items() if k != "config"} | {"model": r["config"]["model"]} for r in runs],
    }
    with open(a.out + ".json", "w") as f:
        json.dump(rec, f, indent=1)
        f.write("\n")
    with open(a.out + ".md", "w") as f:
        f.write(md)
    print(md, end="")
    if not rec["same_tokens"]:
        print("plot_quality: warning: the runs differ in data, seed or train settings", file=sys.stderr)
    print(f"plot_quality: wrote {a.out}.json, {a.out}.md" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
