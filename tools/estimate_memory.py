"""Per-GPU training memory of a config, and the longest context that fits a card.

    # one config (its parallel:, train: and model: sections; key=value overrides as for pretrain)
    python tools/estimate_memory.py --config configs/longctx/mdn_1.3b_128k_4gpu.yaml
    # the longest context of a model on 1, 2, 4, 8 cards of 80 GB (H100), bf16
    python tools/estimate_memory.py --config configs/mdn_1.3b.yaml --longest --gpus 1 2 4 8 --card-gib 79.1
    # --json for machine-readable output

The formulas are in mdn_scale/train/memory.py (parameters, gradients, optimizer, activations
including the MDN op's per-chunk state pairs and its backward workspace, the LM-head loss
(model.loss_chunk_tokens), recurrent states, CP buffers). Components are listed, then the four
moments of a step whose largest sets the peak; `allocated` (static + that moment) is what
torch.cuda.max_memory_allocated measures, `total` adds a constant reserve (CUDA context, NCCL,
allocator slack: --reserve-gib). Put key=value overrides before --longest/--gpus.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _model_and_layout(config: str, overrides: list[str]):
    import yaml

    from mdn_scale.model import ModelConfig
    from mdn_scale.train.memory import Layout

    if not os.path.isfile(config):
        raise ValueError(f"--config: no such file {config!r}")
    with open(config) as f:
        raw = yaml.safe_load(f) or {}
    from mdn_scale.train.config import apply_override

    for ov in overrides:
        apply_override(raw, ov)
    if "model" not in raw:
        raise ValueError(f"{config}: no model: section")
    cfg = ModelConfig.from_dict(raw["model"])
    p, t = raw.get("parallel") or {}, raw.get("train") or {}
    known_p = {"tensor", "pipeline", "context", "sequence_parallel", "distributed_optimizer", "cp_lean",
               "cp_lean_segment_tokens"}
    if set(p) - known_p:
        raise ValueError(f"unknown key(s) parallel.{sorted(set(p) - known_p)}")
    lay = Layout(tp=int(p.get("tensor", 1)), pp=int(p.get("pipeline", 1)), cp=int(p.get("context", 1)),
                 micro_batch=int(t.get("micro_batch", 1)), seq_len=int(t.get("seq_len", cfg.seq_len)),
                 precision=str(t.get("precision", "fp32")), recompute=bool(t.get("recompute", False)),
                 recompute_offload=bool(t.get("recompute_offload", False)),
                 recompute_keep_cp_maps=bool(t.get("recompute_keep_cp_maps", False)),
                 distributed_optimizer=bool(p.get("distributed_optimizer", False)),
                 # off in the config: what the environment says (MDN_CP_LEAN*), as the op reads it
                 cp_lean=True if p.get("cp_lean") else None,
                 cp_lean_segment_tokens=int(p["cp_lean_segment_tokens"]) if p.get("cp_lean") else None,
                 op_backward_segments=(int(t["op_backward_segments"]) if "op_backward_segments" in t
                                       else None))
    return cfg, lay


def format_estimate(est: dict) -> str:
    from mdn_scale.train.memory import GIB

    lines = [f"{'component':<28}{'GiB':>10}"]
    for k, v in est.items():
        if k in ("params_on_rank", "tokens_per_rank", "allocated", "reserve", "total", "moments", "peak_at"):
            continue
        lines.append(f"{k:<28}{v / GIB:>10.3f}")
    lines.append("peak = static + the largest moment:")
    for k, v in est["moments"].items():
        lines.append(f"  {k:<26}{v / GIB:>10.3f}" + ("   <- peak" if k == est["peak_at"] else ""))
    lines += [f"{'allocated':<28}{est['allocated'] / GIB:>10.3f}",
              f"{'reserve':<28}{est['reserve'] / GIB:>10.3f}",
              f"{'total':<28}{est['total'] / GIB:>10.3f}",
              f"(parameters on this rank: {est['params_on_rank']:,}; tokens per rank: {est['tokens_per_rank']:,})"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--longest", action="store_true", help="find the longest context per GPU count")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--card-gib", type=float, default=79.1, help="memory of one card (H100 80GB: 79.1 GiB)")
    ap.add_argument("--reserve-gib", type=float, default=3.0)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                    help="precision (default: the config's train.precision; with --longest, "
                         "else bf16)")
    ap.add_argument("--no-tp", action="store_true", help="--longest: CP only (TP = 1)")
    ap.add_argument("--no-zero", action="store_true",
                    help="--longest: without parallel.distributed_optimizer (ZeRO-1 over dp×cp)")
    ap.add_argument("--offload", action="store_true",
                    help="--longest: recompute with the layer inputs in host memory "
                         "(train.recompute_offload; also taken from the config)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("overrides", nargs="*", metavar="key.sub=value")
    a = ap.parse_args(argv)
    try:
        from mdn_scale.train.memory import GIB, estimate, longest_context

        cfg, lay = _model_and_layout(a.config, a.overrides)
        if a.card_gib <= 0 or a.reserve_gib < 0:
            raise ValueError("--card-gib must be > 0 and --reserve-gib >= 0")
        if not a.longest:
            if a.precision:   # as train.precision=... would
                lay = dataclasses.replace(lay, precision=a.precision)
            est = estimate(cfg, lay, reserve_gib=a.reserve_gib)
            if a.json:
                print(json.dumps({"layout": vars(lay), "bytes": est}))
            else:
                print(f"tp={lay.tp} pp={lay.pp} cp={lay.cp} micro_batch={lay.micro_batch} "
                      f"seq_len={lay.seq_len} precision={lay.precision} recompute={lay.recompute} "
                      f"distributed_optimizer={lay.distributed_optimizer}")
                print(format_estimate(est))
            return 0
        precision = a.precision or (lay.precision if lay.precision == "bf16" else "bf16")
        rows = []
        for g in a.gpus:
            if g < 1:
                raise ValueError(f"--gpus: {g} is not a GPU count")
            best = longest_context(cfg, g, a.card_gib, precision=precision,
                                   reserve_gib=a.reserve_gib, allow_tp=not a.no_tp,
                                   distributed_optimizer=not a.no_zero,
                                   offload=lay.recompute_offload or a.offload)
            rows.append({"gpus": g, **({k: v for k, v in best.items() if k != "estimate"}
                                       if best else {"seq_len": 0}),
                         "total_gib": best["estimate"]["total"] / GIB if best else None})
        if a.json:
            print(json.dumps(rows))
        else:
            print(f"longest context, micro_batch 1, {precision}, {a.card_gib} GiB cards:")
            print(f"{'gpus':>5}{'seq_len':>12}{'tp':>4}{'cp':>4}{'recompute':>11}{'GiB':>9}")
            for r in rows:
                if not r["seq_len"]:
                    print(f"{r['gpus']:>5}{'none fits':>12}")
                else:
                    print(f"{r['gpus']:>5}{r['seq_len']:>12,}{r['tp']:>4}{r['cp']:>4}"
                          f"{str(r['recompute']):>11}{r['total_gib']:>9.2f}")
    except (ValueError, KeyError) as e:
        print(f"estimate_memory: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
