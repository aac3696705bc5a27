"""Where a run stands, for the SLURM batch script: has it reached train.steps?

    python launch/slurm/run_state.py --config configs/X.yaml key.sub=value ...

takes the same arguments as launch/pretrain.py, prints one line
``step=S steps=N checkpoint_dir=D`` (S: the newest complete checkpoint, 0 if none) and exits

    0  finished: a complete checkpoint at step >= train.steps
    1  unfinished, resumable: the next start resumes from step S
    2  bad config (the trainer's message)
    3  unfinished and not resumable: checkpoint.interval is 0, a restart would begin again

It runs on the batch node before and after every start of a job, so it stays light: no torch
import (about 0.1 s instead of several seconds on a busy node). The config goes through the
trainer's own loader (unknown keys and bad values of the trainer's sections are errors here
already); the model and data sections are left as they are, and the trainer checks them
before any work. A checkpoint counts when it is complete in the trainer's sense
(mdn_scale.train.checkpoint.verify: its meta file exists and lists every file with its size;
tests/slurm/test_run_state.py holds the two to the same verdicts).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)  # a checkout without an installed package

FINISHED, RESUMABLE, BAD_CONFIG, NOT_RESUMABLE = 0, 1, 2, 3
META = "meta.json"  # mdn_scale.train.checkpoint.META
STEP_DIR = re.compile(r"^step_(\d{8})$")  # mdn_scale.train.checkpoint.STEP_DIR


def is_complete(path: str) -> bool:
    """What checkpoint.verify accepts, without importing torch: the meta file is readable and
    every file it lists exists with the size it records."""
    try:
        with open(os.path.join(path, META)) as f:
            files = json.load(f).get("files", {})
        return all(os.path.getsize(os.path.join(path, rel)) == size for rel, size in files.items())
    except (OSError, ValueError, AttributeError):
        return False


def newest_complete_step(directory: str) -> int:
    if not directory or not os.path.isdir(directory):
        return 0
    steps = sorted(int(m.group(1)) for n in os.listdir(directory) if (m := STEP_DIR.match(n)))
    for step in reversed(steps):
        if is_complete(os.path.join(directory, f"step_{step:08d}")):
            return step  # a save cut short is skipped, as the trainer skips it
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="run_state", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config (default: configs/tiny.yaml, as the trainer)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_args(argv)

    from mdn_scale.train.config import ConfigError, load_config

    try:
        cfg = load_config(args.config or os.path.join(ROOT, "configs", "tiny.yaml"), args.overrides,
                          foreign={"model": Any, "data": Any})  # those schemas import torch
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
