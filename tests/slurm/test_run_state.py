"""launch/slurm/run_state.py, which pretrain.sbatch asks whether to requeue: exit codes and the
step it reports, on checkpoint folders laid out as the trainer writes them. (The SLURM test
exercises it on real checkpoints; these cases are the ones that run cannot reach.)"""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
spec = importlib.util.spec_from_file_location("run_state", os.path.join(ROOT, "launch", "slurm", "run_state.py"))
run_state = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_state)

TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def fake_checkpoint(ckpt, step, *, complete=True):
    """A step folder as checkpoint.save leaves it: meta.json lists every file with its size."""
    d = ckpt / f"step_{step:08d}"
    d.mkdir(parents=True)
    (d / "__0_0.distcp").write_bytes(b"x" * 10)
    if complete:
        (d / "meta.json").write_text(json.dumps({"step": step, "files": {"__0_0.distcp": 10}}))


def agrees_with_trainer(path) -> bool:
    """run_state's verdict on one step folder is the trainer's (checkpoint.verify)."""
    from mdn_scale.train import checkpoint

    try:
        checkpoint.verify(str(path))
        trainer_ok = True
    except checkpoint.CheckpointError:
        trainer_ok = False
    return run_state.is_complete(str(path)) == trainer_ok


def test_same_layout_as_the_trainer():
    from mdn_scale.train import checkpoint

    assert run_state.META == checkpoint.META
    assert run_state.STEP_DIR.pattern == checkpoint.STEP_DIR.pattern
    assert run_state.STEP_DIR.match(checkpoint.step_dir_name(123))


def state(capsys, *overrides):
    code = run_state.main(["--config", TINY, *overrides])
    out, err = capsys.readouterr()
    return code, out, err


def test_codes(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    args = ("train.steps=20", f"checkpoint.dir={ckpt}", "checkpoint.interval=5")

    assert state(capsys, *args)[:2] == (run_state.RESUMABLE, f"step=0 steps=20 checkpoint_dir={ckpt}\n")

    fake_checkpoint(ckpt, 10)
    fake_checkpoint(ckpt, 15, complete=False)  # a save cut short: not counted
    assert state(capsys, *args)[:2] == (run_state.RESUMABLE, f"step=10 steps=20 checkpoint_dir={ckpt}\n")

    fake_checkpoint(ckpt, 20)
    assert state(capsys, *args)[:2] == (run_state.FINISHED, f"step=20 steps=20 checkpoint_dir={ckpt}\n")

    # A shard shorter than meta.json says: not complete either.
    (ckpt / "step_00000020" / "__0_0.distcp").write_bytes(b"x")
    assert state(capsys, *args)[0] == run_state.RESUMABLE
    for step in (10, 15, 20):
        assert agrees_with_trainer(ckpt / f"step_{step:08d}"), step

    assert state(capsys, "train.steps=20", f"checkpoint.dir={tmp_path}/none",
                 "checkpoint.interval=0")[0] == run_state.NOT_RESUMABLE


@pytest.mark.parametrize("override, named", [("train.stepz=3", "train.stepz"),
                                             ("train.steps=many", "train.steps")])
def test_bad_config_names_the_key(capsys, override, named):
    code, out, err = state(capsys, override)
    assert code == run_state.BAD_CONFIG and out == ""
    assert "run_state: config error" in err and named in err
