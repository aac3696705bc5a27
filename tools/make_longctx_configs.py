"""Write configs/longctx/*.yaml: long-context continued-pretraining recipes for the 400M and 1.3B
MDN at 32K, 128K, 512K and 1M tokens, each on the fewest of 1, 2, 4, 8 GPUs (one node) that the
memory estimate (mdn_scale/train/memory.py) says fits an 80 GB H100 — or on 8 GPUs with a note
when none does — and the EXTRA recipes on a given GPU count (mdn_1.3b_1m_4gpu.yaml). The layout
(TP, CP, recompute, the layer inputs in host memory, the lean CP node) is the estimator's choice,
the costlier settings only where the cheaper ones do not fit.

    python tools/make_longctx_configs.py [--out configs/longctx] [--check]

--check: exit 1 if the files on disk differ from what would be written (CI runs it).
"""

from __future__ import annotations

import argparse
import os
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MODELS = {"400m": "configs/mdn_400m.yaml", "1.3b": "configs/mdn_1.3b.yaml"}
LENGTHS = {"32k": 32768, "128k": 131072, "512k": 524288, "1m": 1048576}
GPUS = (1, 2, 4, 8)
CARD_GIB = 79.1
TOKENS_PER_STEP = 1 << 20  # about 1M tokens per optimizer step
LOSS_CHUNK_TOKENS = 4096  # chunked LM-head loss (mdn_scale/model/loss.py): no [T, vocab] logits


def _model_section(name: str) -> dict:
    with open(os.path.join(ROOT, MODELS[name])) as f:
        doc = yaml.safe_load(f)
    return doc["model"] if "model" in doc else doc


SEGMENT_TOKENS = 16384  # the lean CP node's backward segments (parallel.cp_lean_segment_tokens)


def choose_layout(model_cfg, seq_len: int, gpu_counts=GPUS, fused: bool = False):
    """(gpus, tp, cp, level, estimate, fits) with the fewest of gpu_counts that fit, else the
    best on the last. level: 0 no recompute, 1 recompute, 2 recompute with the layer inputs in
    host memory and, under CP, the op's lean node in segments; the costlier settings only where
    the cheaper ones do not fit. fused: FLA's conv and gated norm counts (model.mixer_kernels)
    and the Triton block norm's (model.norm_kernel) and the compiled SwiGLU's (model.mlp_kernel),
    else the eager ones (the larger)."""
    from mdn_scale.train.memory import GIB, Layout, estimate, layouts_for

    last = None
    for g in gpu_counts:
        cands = []
        for tp, cp in layouts_for(g, model_cfg.num_heads):
            if seq_len % (cp * model_cfg.chunk_size):
                continue
            for rc in (0, 1, 2):
                # fused_mixer=False: the eager conv/norm counts (the larger), so the generated
                # files do not depend on whether fla-core is installed where they are made; the
                # gates too are given, not taken from the host (CUDA or not)
                lean = rc == 2 and cp > 1
                est = estimate(model_cfg, Layout(
                    tp=tp, cp=cp, seq_len=seq_len, recompute=rc > 0, recompute_offload=rc == 2,
                    distributed_optimizer=True, fused_mixer=fused, triton_norm=fused,
                    compiled_mlp=fused,
                    fused_gates=fused, cp_lean=lean,
                    cp_lean_segment_tokens=SEGMENT_TOKENS if lean else 0))
                cands.append((est["total"], tp, cp, rc, est))
        fitting = [c for c in cands if c[0] <= CARD_GIB * GIB]
        if fitting:
            # prefer no recompute (faster), then less TP (fewer collectives per layer)
            best = min(fitting, key=lambda c: (c[3], c[1], c[0]))
            return g, best[1], best[2], best[3], best[4], True
        last = min(cands, key=lambda c: c[0])
    return gpu_counts[-1], last[1], last[2], last[3], last[4], False


# Recipes beyond "the fewest GPUs by the eager counts": (model, length, GPUs). They take FLA's
# fused gated norm (model.mixer_kernels: fla, a clear error where fla-core is missing), whose
# smaller saved set is what lets 1M tokens of the 1.3B model fit 4 GPUs (BENCHMARKS.md, session
# 10: one rank of it measured at 67.4 GiB on a GPU standing in for it).
EXTRA = [("1.3b", "1m", 4)]


def config_name(model_name: str, length_name: str, gpus: int | None = None) -> str:
    return f"mdn_{model_name}_{length_name}" + (f"_{gpus}gpu" if gpus else "") + ".yaml"


def render(model_name: str, length_name: str, gpus_wanted: int | None = None) -> str:
    from mdn_scale.model import ModelConfig
    from mdn_scale.train.memory import GIB

    model = dict(_model_section(model_name))
    seq_len = LENGTHS[length_name]
    model["seq_len"] = seq_len
    model["loss_chunk_tokens"] = LOSS_CHUNK_TOKENS
    if gpus_wanted:
        model["mixer_kernels"] = "fla"
    cfg = ModelConfig.from_dict(model)
    if gpus_wanted:
        gpus, tp, cp, level, est, fits = choose_layout(cfg, seq_len, gpu_counts=(gpus_wanted,), fused=True)
    else:
        gpus, tp, cp, level, est, fits = choose_layout(cfg, seq_len)
    rc, offload, lean = level > 0, level == 2, level == 2 and cp > 1
    dp = gpus // (tp * cp)
    global_batch = max(dp, TOKENS_PER_STEP // seq_len)
    global_batch -= global_batch % dp
    note = (f"estimated {est['total'] / GIB:.1f} GiB per GPU (tools/estimate_memory.py), fits an 80 GB H100"
            if fits else
            f"DOES NOT FIT 8 x 80 GB by the estimate ({est['total'] / GIB:.1f} GiB per GPU at the best layout): "
            "the rebuilt layer and the MDN op's backward (per-chunk state pairs and their gradients) "
            "dominate; needs more GPUs (larger parallel.context, several nodes)")
    doc = {
        "seed": 1234,
        "parallel": {"tensor": tp, "pipeline": 1, "context": cp, "distributed_optimizer": True,
                     **({"cp_lean": True, "cp_lean_segment_tokens": SEGMENT_TOKENS} if lean else {})},
        "train": {"steps": 2000, "global_batch": global_batch, "micro_batch": 1, "seq_len": seq_len,
                  "lr": 1.0e-4, "min_lr_ratio": 0.1, "warmup_steps": 100, "decay": "cosine",
                  "weight_decay": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_eps": 1.0e-15,
                  "grad_clip": 1.0, "precision": "bf16", "recompute": rc,
                  **({"recompute_offload": True} if offload else {})},
        "model": model,
        "data": {"datasets": [
            {"path": "data/fineweb-gpt2", "weight": 0.6},
            {"path": "data/long-gpt2", "weight": 0.4, "min_doc_tokens": 4096,
             "upsample_min_tokens": min(seq_len // 2, 65536), "upsample_factor": 4}],
            "packing": "keep_whole", "validation_fraction": 0.001},
        "checkpoint": {"dir": f"runs/{model_name}_{length_name}/checkpoints", "interval": 200,
                       "keep_last": 2, "init_from": f"runs/{model_name}/checkpoints",
                       "init_optimizer": "fresh"},
        "logging": {"dir": f"runs/{model_name}_{length_name}", "interval": 1, "tensorboard": True},
        "eval": {"interval": 200, "batches": 4},
    }
    head = (f"# Long-context continued pretraining: MDN {model_name.upper()} at {seq_len:,} tokens on {gpus} GPU(s)\n"
            f"# (generated by tools/make_longctx_configs.py; edit that, not this file).\n"
            f"# Layout: TP={tp}, CP={cp}, DP={dp}, recompute={rc}"
            + (", the layer inputs in host memory" if offload else "")
            + (f", the lean CP node in {SEGMENT_TOKENS}-token segments" if lean else "")
            + f", ZeRO-1 optimizer: {note}.\n"
            f"# Starts from the pretraining run's newest checkpoint (checkpoint.init_from) with a fresh\n"
            f"# optimizer and a 100-step re-warmup; long documents up-sampled and packed whole.\n"
            f"#   torchrun --standalone --nproc-per-node {gpus} launch/pretrain.py --config "
            f"configs/longctx/{config_name(model_name, length_name, gpus_wanted)}\n")
    return head + yaml.safe_dump(doc, sort_keys=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "configs", "longctx"))
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args(argv)
    stale = []
    os.makedirs(a.out, exist_ok=True) if not a.check else None
    jobs = [(m, n, None) for m in MODELS for n in LENGTHS] + EXTRA
    for m, n, g in jobs:
        path = os.path.join(a.out, config_name(m, n, g))
        text = render(m, n, g)
        if a.check:
            if not os.path.isfile(path) or open(path).read() != text:
                stale.append(path)
        else:
            with open(path, "w") as f:
                f.write(text)
            print(f"wrote {path}")
    if stale:
        print("out of date (run tools/make_longctx_configs.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
