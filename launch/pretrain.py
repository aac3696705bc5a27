"""Entry point: `torchrun --nproc-per-node N launch/pretrain.py --config configs/X.yaml key.sub=value ...`

With no arguments it trains the demo (configs/tiny.yaml on the standard-library shards, built on
first use). NCCL on CUDA GPUs, gloo on CPU. The config is validated before any process group,
model or data is built; errors name the key.
"""

from __future__ import annotations

import argparse
import os
import sys

# `python launch/pretrain.py` from a checkout without an installed package
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "configs", "tiny.yaml")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config (default: the demo, configs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="override a config value, e.g. train.steps=100 parallel.tensor=2")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch

    from mdn_scale.train.config import ConfigError, load_config, validate
    from mdn_scale.train.distributed import world_size_from_env

    try:
        cfg = load_config(args.config or DEMO_CONFIG, args.overrides)
        validate(cfg, world_size_from_env(), has_cuda=torch.cuda.is_available())
        from mdn_scale.model import check_parallel

        try:
            check_parallel(cfg.model, cfg.parallel.tensor, cfg.parallel.pipeline, cfg.parallel.context)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        from mdn_scale.train.demo_data import check_data

        check_data(cfg)
    except ConfigError as e:
        print(f"pretrain: config error: {e}", file=sys.stderr)
        return 2

    from mdn_scale.train.distributed import init_distributed, shutdown
    from mdn_scale.train.trainer import train

    layout = init_distributed(tensor=cfg.parallel.tensor, pipeline=cfg.parallel.pipeline,
                              context=cfg.parallel.context)
    try:
        from mdn_scale.train.demo_data import ensure_demo_shards

        ensure_demo_shards(cfg, layout)
        result = train(cfg, layout)
    finally:
        shutdown()
    if layout.is_logger:
        if result["step"] == result["start_step"]:   # resumed a finished run: no step ran
            print(f"nothing to train: the run in {cfg.checkpoint.dir} is at step {result['step']} "
                  f"of train.steps={cfg.train.steps}; raise train.steps to go on, or give "
                  f"another checkpoint.dir and logging.dir for a new run")
        else:
            how = "stopped by signal" if result["stopped"] else "done"
            print(f"{how} at step {result['step']}: loss {result['loss']:.4f}, logs in "
                  f"{cfg.logging.dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
