"""Loss and throughput curves of one or several runs to a PNG.

    python tools/plot_metrics.py runs/demo [runs/other ...] -o curves.png

Each argument is a run's logging.dir (or its metrics.jsonl). Panels: training loss (and
validation loss where logged) against tokens, and tokens/s against step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def read_metrics(path: str) -> tuple[list[dict], list[dict]]:
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no metrics.jsonl")
    train, val = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except ValueError:
                print(f"warning: {path}:{n}: not JSON, skipped", file=sys.stderr)
                continue
            (train if "loss" in r else val if "val_loss" in r else []).append(r)
    return train, val


def plot(runs: list[str], output: str, labels: list[str] | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_tps) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, run in enumerate(runs):
        label = labels[i] if labels else os.path.basename(os.path.normpath(run)) or run
        train, val = read_metrics(run)
        if not train:
            raise ValueError(f"{run}: no training records in metrics.jsonl")
        line, = ax_loss.plot([r["tokens"] for r in train], [r["loss"] for r in train], label=label)
        if val:
            tokens_at = {r["step"]: r["tokens"] for r in train}
            xs = [tokens_at.get(r["step"], None) for r in val]
            pts = [(x, r["val_loss"]) for x, r in zip(xs, val) if x is not None]
            if pts:
                ax_loss.plot(*zip(*pts), "o--", color=line.get_color(), label=f"{label} (validation)")
        ax_tps.plot([r["step"] for r in train], [r["tokens_per_s"] for r in train], label=label)
    ax_loss.set(xlabel="tokens", ylabel="loss", title="loss")
    ax_tps.set(xlabel="step", ylabel="tokens / s", title="throughput")
    for ax in (ax_loss, ax_tps):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run logging dirs or metrics.jsonl files")
    p.add_argument("-o", "--output", default="metrics.png", help="PNG to write (default metrics.png)")
    p.add_argument("--labels", nargs="*", help="legend labels, one per run")
    a = p.parse_args(argv)
    if a.labels and len(a.labels) != len(a.runs):
        p.error("--labels needs one label per run")
    try:
        print(plot(a.runs, a.output, a.labels))
    except (FileNotFoundError, ValueError) as e:
        print(f"plot_metrics: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
