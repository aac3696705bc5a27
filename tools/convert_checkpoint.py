"""Convert between our checkpoints and the HF-style layout (DESIGN §6 names).

    # ours -> HF folder (config.json, model.safetensors, trust_remote_code modules)
    python tools/convert_checkpoint.py to-hf --config configs/mdn_400m.yaml \
        --weights CKPT --out hf_out/ [--prefix model.] [--dtype bf16]

    # HF folder -> ours (a canonical safetensors file + the model: section as YAML)
    python tools/convert_checkpoint.py from-hf --hf hf_dir/ --out model.safetensors \
        [--config-out model.yaml]

CKPT is a canonical safetensors file (keys of the model's sharded_state_dict(), full tensors:
what mdn_scale.model.sharding.gather_full_state_dict returns), or a torch.distributed.checkpoint
directory whose tensor keys are those keys after `--prefix` (loaded to full tensors in this one
process). Tensors are read with safetensors / weights_only loading; names and shapes are checked
against the config and every mismatch is reported by name.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import yaml

from mdn_scale.model import ModelConfig
from mdn_scale.model.convert import export_hf, import_hf, load_tensors

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def load_ours(path: str, prefix: str = "") -> dict:
    """Canonical full state dict from a safetensors / torch file or a DCP directory."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, ".metadata")):
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
        sd = _load_state_dict_from_keys(checkpoint_id=path)
        flat = {}

        def walk(d, pre=""):
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(v, f"{pre}{k}.")
                elif isinstance(v, torch.Tensor):
                    flat[pre + k] = v
        walk(sd)
        sd = flat
    else:
        sd = load_tensors(path)
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not sd:
            raise ValueError(f"{path}: no tensors under prefix {prefix!r}")
    return sd


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt")


def copy_tokenizer(src: str, out_dir: str) -> None:
    import shutil
    files = [src] if os.path.isfile(src) else [os.path.join(src, f) for f in TOKENIZER_FILES
                                               if os.path.exists(os.path.join(src, f))]
    if not files:
        raise ValueError(f"--tokenizer {src}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    for f in files:
        shutil.copyfile(f, os.path.join(out_dir, os.path.basename(f)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-hf")
    a.add_argument("--config", required=True, help="YAML with a model: section")
    a.add_argument("--weights", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--prefix", default="", help="strip this key prefix (e.g. 'model.')")
    a.add_argument("--dtype", choices=sorted(DTYPES), default=None)
    a.add_argument("--tokenizer", default=None,
                   help="tokenizer.json, or a folder whose tokenizer files are copied along")
    b = sub.add_parser("from-hf")
    b.add_argument("--hf", required=True, help="HF folder (config.json + weights)")
    b.add_argument("--out", required=True, help="canonical .safetensors to write")
    b.add_argument("--config-out", default=None, help="write the model: section here")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "to-hf":
            with open(args.config) as f:
                doc = yaml.safe_load(f) or {}
            if "model" not in doc:
                raise ValueError(f"{args.config}: no model: section")
            cfg = ModelConfig.from_dict(doc["model"])
            full = load_ours(args.weights, args.prefix)
            export_hf(full, cfg, args.out, DTYPES[args.dtype] if args.dtype else None)
            if args.tokenizer:
                copy_tokenizer(args.tokenizer, args.out)
            print(f"wrote {args.out} ({len(full)} tensors)")
        else:
            from safetensors.torch import save_file
            cfg, full = import_hf(args.hf)
            save_file({k: v.contiguous() for k, v in full.items()}, args.out)
            if args.config_out:
                with open(args.config_out, "w") as f:
                    yaml.safe_dump({"model": cfg.to_dict()}, f, sort_keys=False)
            print(f"wrote {args.out} ({len(full)} tensors)")
    except (ValueError, KeyError) as e:
        sys.exit(f"convert_checkpoint: {e}")


if __name__ == "__main__":
    main()
