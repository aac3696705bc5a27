"""Convert a checkpoint of the DeepSpeed backend (train.backend=deepspeed; ZeRO 1/2/3, any world
size) to full weights, to our checkpoint format, or to the HF layout.

    # a checkpoint the Megatron backend resumes from (checkpoint.dir=OUT): weights, Adam
    # moments, step, lr schedule, consumed tokens, and the loader position / RNG of every rank
    python tools/convert_deepspeed_checkpoint.py to-ours --config RUN.yaml \
        --ds runs/x/checkpoints/step_00001000 --out runs/x_megatron/checkpoints

    # canonical full weights (the keys of the model's sharded_state_dict(): what
    # tools/convert_checkpoint.py to-hf reads)
    python tools/convert_deepspeed_checkpoint.py to-full --config RUN.yaml --ds STEP_DIR --out w.safetensors

    # the HF folder (DESIGN §6 names)
    python tools/convert_deepspeed_checkpoint.py to-hf --config RUN.yaml --ds STEP_DIR --out hf/ [--dtype bf16]

RUN.yaml is any YAML with the run's ``model:`` section. DeepSpeed's files are read with
``torch.load(weights_only=True)`` (mdn_scale.train.deepspeed_checkpoint); every parameter's name
and shape is checked against the model built from the config. Runs in one CPU process.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = ("fp32", "bf16", "fp16")


def _model(model_cfg):
    """The model (TP = PP = 1) in a one-process gloo world, weights from the CPU init."""
    from mdn_scale.train.config import RunConfig
    from mdn_scale.train.distributed import init_distributed
    from mdn_scale.train.trainer import build_model

    layout = init_distributed(tensor=1, pipeline=1, context=1)
    return build_model(RunConfig(model=model_cfg), layout)


class _SavedSchedule:
    """checkpoint.save asks the scheduler for its state: the DeepSpeed run's, unchanged."""

    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state


def to_ours(model, ds_path: str, out_dir: str) -> str:
    import torch

    from mdn_scale.train import checkpoint as ckpt
    from mdn_scale.train.config import TrainConfig
    from mdn_scale.train.deepspeed_checkpoint import load_weights_into, read_zero_checkpoint
    from mdn_scale.train.optimizer import build_optimizer

    meta = ckpt.verify(ds_path)
    if meta.get("format") != "deepspeed":
        raise ValueError(f"{ds_path}: not a checkpoint of the DeepSpeed backend (meta.json has no "
                         "\"format\": \"deepspeed\")")
    weights, moments, opt_step, _ = read_zero_checkpoint(ds_path)
    load_weights_into(model, weights, ds_path)
    optimizer = build_optimizer(model, TrainConfig())
    for name, p in model.named_parameters():
        optimizer.state[p] = {"step": torch.tensor(opt_step), **moments[name]}
    path = ckpt.save(out_dir, step=meta["step"], model=model, optimizer=optimizer,
                     scheduler=_SavedSchedule(meta["scheduler"]), extra={}, keep_last=0,
                     meta={k: meta[k] for k in ("consumed_tokens", "skipped_steps", "data", "layout")})
    # Every rank's RNG and loader position, as the DeepSpeed run saved them: a Megatron run of
    # the same world size resumes exactly; another world size reshards from meta["data"].
    shutil.rmtree(os.path.join(path, "extra"))
    shutil.copytree(os.path.join(ds_path, "extra"), os.path.join(path, "extra"))
    with open(os.path.join(path, ckpt.META)) as f:
        record = json.load(f)
    record["world_size"] = meta["world_size"]
    record["converted_from"] = os.path.abspath(ds_path)
    record["files"] = {os.path.relpath(os.path.join(root, n), path): os.path.getsize(os.path.join(root, n))
                       for root, _, names in os.walk(path) for n in names if n != ckpt.META}
    ckpt._write_atomic(os.path.join(path, ckpt.META), json.dumps(record, indent=1))
    return path


def full_weights(model, ds_path: str) -> dict:
    from mdn_scale.model.sharding import gather_full_state_dict
    from mdn_scale.train.deepspeed_checkpoint import load_weights_into, read_zero_checkpoint

    weights, _, _, _ = read_zero_checkpoint(ds_path, moments=False)
    load_weights_into(model, weights, ds_path)
    return gather_full_state_dict(model)


def convert(cmd: str, model_cfg, ds_path: str, out: str, dtype: str | None = None) -> str:
    """One conversion (``cmd`` as on the command line) in this process; needs a process group
    (a world of one is started if there is none). Returns a line saying what was written."""
    if not os.path.isdir(ds_path):
        raise ValueError(f"--ds {ds_path}: no such folder")
    model = _model(model_cfg)
    if cmd == "to-ours":
        return f"wrote {to_ours(model, ds_path, out)}"
    import torch

    full = full_weights(model, ds_path)
    if cmd == "to-full":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in full.items()}, out)
    elif cmd == "to-hf":
        from mdn_scale.model.convert import export_hf

        export_hf(full, model_cfg, out,
                  {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype))
    else:
        raise ValueError(f"unknown conversion {cmd!r}")
    return f"wrote {out} ({len(full)} tensors)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=("to-ours", "to-full", "to-hf"))
    ap.add_argument("--config", required=True, help="YAML with the run's model: section")
    ap.add_argument("--ds", required=True, help="a step_XXXXXXXX folder of the DeepSpeed backend")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", choices=DTYPES, default=None, help="to-hf: tensor dtype")
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import yaml

        from mdn_scale.model import ModelConfig

        with open(args.config) as f:
            doc = yaml.safe_load(f) or {}
        if "model" not in doc:
            raise ValueError(f"{args.config}: no model: section")
        print(convert(args.cmd, ModelConfig.from_dict(doc["model"]), args.ds, args.out, args.dtype))
    except (ValueError, KeyError) as e:
        sys.exit(f"convert_deepspeed_checkpoint: {e}")
    finally:
        from mdn_scale.train.distributed import shutdown

        shutdown()


if __name__ == "__main__":
    main()
