"""Parameter counts and FLOPs per token of a model config.

    python tools/model_stats.py configs/mdn_400m.yaml [--seq-len 4096] [--tensor-parallel 1] [--json]

Reads the YAML's `model:` section (a ModelConfig). The FLOP formula (incl. the recurrence's own
cost) is in mdn_scale/model/stats.py's docstring, printed with --explain.
"""
from __future__ import annotations

import argparse
import json
import sys

import yaml

from mdn_scale.model import ModelConfig
from mdn_scale.model import stats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--tensor-parallel", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--explain", action="store_true", help="print the FLOP formula")
    a = ap.parse_args(argv)
    with open(a.config) as f:
        doc = yaml.safe_load(f) or {}
    if "model" not in doc:
        sys.exit(f"{a.config}: no `model:` section")
    cfg = ModelConfig.from_dict(doc["model"])
    s = stats.model_stats(cfg, a.seq_len, a.tensor_parallel)
    if a.json:
        print(json.dumps(s, indent=1))
        return
    if a.explain:
        print(stats.__doc__)
    print(f"{a.config}: mixer={cfg.mixer} layers={cfg.num_layers} d={cfg.hidden_size} "
          f"H={cfg.num_heads} K={cfg.head_k_dim} V={cfg.head_v_dim} ffn={s['ffn_hidden_size']} "
          f"vocab={cfg.vocab_size} (padded {s['padded_vocab_size']})")
    print("layer types: " + "".join("A" if t == "attention" else t[0].upper() for t in s["layer_types"]))
    print(f"parameters: {s['params_total']/1e6:.2f}M total, {s['params_non_embedding']/1e6:.2f}M "
          f"without the input embedding ({s['params_embedding']/1e6:.2f}M), LM head "
          f"{s['params_lm_head']/1e6:.2f}M")
    for t, n in s["params_per_layer"].items():
        print(f"  per {t} layer: {n/1e6:.3f}M")
    f = s["flops_per_token_forward"]
    print(f"FLOPs/token forward at seq_len {s['seq_len']}: {f['total']/1e9:.3f} G "
          + ", ".join(f"{k} {v/1e9:.3f} G" for k, v in f.items() if k != "total"))
    print(f"FLOPs/token training (3x forward): {s['flops_per_token_train']/1e9:.3f} G")


if __name__ == "__main__":
    main()
