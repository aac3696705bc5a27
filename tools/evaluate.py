"""Perplexity of a checkpoint on shards.

    torchrun --nproc-per-node N tools/evaluate.py --config runs/demo/config.yaml \\
        --checkpoint runs/demo/checkpoints [--shards data/other] [--batches 50] [key=value ...]

--config is the run's config (the resolved copy in its logging.dir works); --checkpoint a
checkpoint.dir (its newest complete checkpoint) or one step_XXXXXXXX folder. Without --shards it
evaluates on the run's validation data; with --shards on every sequence of those shards (read
whole, in order). Any TP/CP/DP layout (parallel.* overrides); the checkpoint reshards on load.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--shards", help="evaluate on these shards (a dataset path) instead of the validation split")
    p.add_argument("--batches", type=int, default=0, help="micro-batches per data-parallel rank (0 = all)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    a = p.parse_args(argv)

    import dataclasses

    import torch

    from mdn_scale.train import checkpoint as ckpt
    from mdn_scale.train.config import ConfigError, load_config, validate
    from mdn_scale.train.distributed import init_distributed, shutdown, world_size_from_env

    try:
        cfg = load_config(a.config, a.overrides + ["checkpoint.interval=0", "eval.interval=0"])
        if a.shards:
            cfg.data = dataclasses.replace(cfg.data, datasets=[a.shards], valid_datasets=[a.shards])
        validate(cfg, world_size_from_env(), has_cuda=torch.cuda.is_available())
    except (ConfigError, ValueError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    if not os.path.isdir(a.checkpoint):
        print(f"evaluate: error: --checkpoint {a.checkpoint!r} is not a folder", file=sys.stderr)
        return 2

    layout = init_distributed(tensor=cfg.parallel.tensor, pipeline=cfg.parallel.pipeline,
                              context=cfg.parallel.context)
    try:
        from mdn_scale.data import build_valid_loader, cp_slice
        from mdn_scale.train.distributed import seed_everything
        from mdn_scale.train.step import evaluate
        from mdn_scale.train.trainer import _dp_cp_group, build_model

        seed_everything(cfg.seed, layout)
        model = build_model(cfg, layout)
        if ckpt.STEP_DIR.match(os.path.basename(os.path.normpath(a.checkpoint))):
            found = (a.checkpoint, ckpt.verify(a.checkpoint))
        else:
            found = ckpt.find_loadable(a.checkpoint)
        if found is None:
            raise ckpt.CheckpointError(f"{a.checkpoint}: no complete checkpoint")
        ckpt.load(found[0], found[1], model=model)
        loader = build_valid_loader(cfg.data, layout.dp_rank, layout.dp)
        batches = []
        for i, mb in enumerate(loader):
            if a.batches and i >= a.batches:
                break
            batches.append(cp_slice(mb, layout.cp_rank, layout.cp) if layout.cp > 1 else mb)
        loss = evaluate(model, batches, precision=cfg.train.precision, device=layout.device,
                        loss_group=_dp_cp_group())
        if layout.is_logger:
            print(f"checkpoint {found[0]} (step {found[1]['step']}): loss {loss:.4f}, "
                  f"perplexity {math.exp(min(loss, 50)):.3f} over {len(batches)} micro-batches per rank")
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
