"""Stop and resume: a run killed by SIGTERM saves, exits cleanly, and resumes to exactly the
uninterrupted losses; TensorBoard events read back with tensorboard's own reader; a checkpoint cut
short is reported and the previous one used. Real processes (launch/pretrain.py), real shards."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    import json as json_pkg

    from mdn_scale.data import make_shards

    out = tmp_path_factory.mktemp("shards") / "json_pkg"
    make_shards([os.path.dirname(json_pkg.__file__)], str(out), progress=False)
    return str(out)


def command(shards, run_dir, *extra):
    return [sys.executable, os.path.join(ROOT, "launch", "pretrain.py"),
            "--config", os.path.join(ROOT, "configs", "tiny.yaml"),
            f"data.datasets=[{shards}]", f"data.valid_datasets=[{shards}]",
            f"train.steps={STEPS}", "train.seq_len=128", "model.seq_len=128",
            "train.global_batch=4", "train.micro_batch=2", "train.warmup_steps=2",
            f"eval.interval={STEPS}", "eval.batches=2", "logging.interval=1", f"logging.dir={run_dir}/log",
            f"checkpoint.dir={run_dir}/ckpt", *extra]


def losses(run_dir, key="loss"):
    out = {}
    for line in open(os.path.join(run_dir, "log", "metrics.jsonl")):
        r = json.loads(line)
        if key in r:
            assert r["step"] not in out, f"step {r['step']} logged twice"  # resumed logs are trimmed
            out[r["step"]] = r[key]
    return out


def tensorboard_losses(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/skipped_steps"):
        assert tag in tags, tags
    events = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert len({s for s, _ in events}) == len(events), events  # a resumed run's events purged
    return dict(events)


def run(cmd, cwd):
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
def test_sigterm_resume_tensorboard_and_cut_checkpoint(shards, tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    run(command(shards, ref_dir, "checkpoint.interval=0"), tmp_path)  # 0 = never save
    assert not os.path.exists(ref_dir / "ckpt")
    ref = losses(ref_dir)
    assert sorted(ref) == list(range(1, STEPS + 1))

    # 1. SIGTERM mid-run: save, exit 0.
    cmd = command(shards, run_dir, "checkpoint.interval=2", "checkpoint.keep_last=10")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    metrics = run_dir / "log" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and sum(1 for _ in open(metrics)) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert "stopping at step" in out, out[-3000:]
    stopped_at = max(losses(run_dir))
    assert 3 <= stopped_at < STEPS, out[-3000:]
    assert os.path.isdir(run_dir / "ckpt" / f"step_{stopped_at:08d}")

    # 2. Resume: exactly the uninterrupted losses.
    out = run(cmd, tmp_path)
    assert f"resumed from {run_dir}/ckpt/step_{stopped_at:08d} at step {stopped_at}" in out
    assert losses(run_dir) == ref

    # 2b. Once more: the run is finished, nothing trains, and the launcher says so.
    out = run(cmd, tmp_path)
    assert f"nothing to train: the run in {run_dir}/ckpt is at step {STEPS}" in out, out[-3000:]
    assert losses(run_dir) == ref

    # 3. TensorBoard events, read back with tensorboard's own reader.
    events = tensorboard_losses(run_dir / "log")
    assert sorted(events) == sorted(ref)
    for step, value in ref.items():
        assert events[step] == pytest.approx(value, rel=1e-6)  # stored as float32

    # 4. The newest checkpoint cut short: reported, the previous complete one used.
    newest = run_dir / "ckpt" / f"step_{STEPS:08d}"
    shard_file = sorted(p for p in os.listdir(newest) if p.endswith(".distcp"))[0]
    os.remove(newest / shard_file)
    previous = sorted(int(n[5:]) for n in os.listdir(run_dir / "ckpt") if n.startswith("step_"))[-2]
    out = run(cmd, tmp_path)
    assert f"step_{STEPS:08d}: file {shard_file} is missing" in out, out[-3000:]
    assert f"resumed from {run_dir}/ckpt/step_{previous:08d} at step {previous}" in out
    assert losses(run_dir) == ref
    events = tensorboard_losses(run_dir / "log")
    assert sorted(events) == sorted(ref)

    # 5. tools/evaluate.py on the final checkpoint reproduces the validation loss the run logged;
    #    tools/plot_metrics.py draws both runs.
    val = losses(run_dir, "val_loss")
    assert list(val) == [STEPS]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "evaluate.py"),
                        "--config", str(run_dir / "log" / "config.yaml"),
                        "--checkpoint", str(run_dir / "ckpt"), "--batches", "2"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"(step {STEPS}): loss {val[STEPS]:.4f}" in r.stdout, r.stdout
    png = tmp_path / "curves.png"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plot_metrics.py"),
                        str(ref_dir / "log"), str(run_dir / "log"), "-o", str(png)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
