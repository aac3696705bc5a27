"""Where a run stands, for the SLURM batch script: has it reached train.steps?

    python launch/slurm/run_state.py --config configs/X.yaml key.sub=value ...

takes the same arguments as launch/pretrain.py, prints one line
``step=S steps=N checkpoint_dir=D`` (S: the newest complete checkpoint, 0 if none) and exits

    0  finished: a complete checkpoint at step >= train.steps
    1  unfinished, resumable: the next start resumes from step S
    2  bad config (the trainer's message)
    3  unfinished and not resumable: checkpoint.interval is 0, a restart would begin again

It reads only the config and the checkpoint folder (each checkpoint's meta file and file sizes,
the trainer's own check), so it runs on the batch node in about a second, with no GPU and no
process group.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # a checkout without an installed package

FINISHED, RESUMABLE, BAD_CONFIG, NOT_RESUMABLE = 0, 1, 2, 3


def newest_complete_step(directory: str) -> int:
    from mdn_scale.train.checkpoint import CheckpointError, list_checkpoints, step_dir_name, verify

    for step in reversed(list_checkpoints(directory)):
        try:
            verify(os.path.join(directory, step_dir_name(step)))
            return step
        except CheckpointError:
            continue  # a save cut short: the trainer skips it too
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="run_state", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config (default: configs/tiny.yaml, as the trainer)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_args(argv)

    from mdn_scale.train.config import ConfigError, load_config

    try:
        cfg = load_config(args.config or os.path.join(ROOT, "configs", "tiny.yaml"), args.overrides)
    except ConfigError as e:
        print(f"run_state: config error: {e}", file=sys.stderr)
        return BAD_CONFIG
    step = newest_complete_step(cfg.checkpoint.dir)
    print(f"step={step} steps={cfg.train.steps} checkpoint_dir={cfg.checkpoint.dir}", flush=True)
    if step >= cfg.train.steps:
        return FINISHED
    return RESUMABLE if cfg.checkpoint.interval > 0 else NOT_RESUMABLE


if __name__ == "__main__":
    sys.exit(main())
