"""Long-context continued pretraining: a tiny checkpoint continued at 4× its sequence length with
CP = 2 (real processes), exact weight loading from our checkpoint, an HF folder and a canonical
file under another layout, config errors, and the long-context evaluation tool's outputs."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest

from train_dist_util import run_workers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
SHORT, LONG = 64, 256  # the source run's and the continued run's sequence lengths (4×)


def _run(cmd, cwd, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def _torchrun(n):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]


def _metrics(log_dir):
    return [json.loads(line) for line in open(os.path.join(log_dir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Shards of the json package's sources and an 8-step tiny run at seq_len 64, saved."""
    import json as json_pkg

    from mdn_scale.data import make_shards

    d = tmp_path_factory.mktemp("longctx")
    shards = str(d / "shards")
    make_shards([os.path.dirname(json_pkg.__file__)], shards, progress=False)
    _run([sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), "--config", TINY,
          f"data.datasets=[{shards}]", "data.validation_fraction=0", "train.steps=8",
          f"train.seq_len={SHORT}", f"model.seq_len={SHORT}", "train.global_batch=4",
          "train.micro_batch=2", "train.warmup_steps=2", "eval.interval=0", "logging.interval=1",
          f"logging.dir={d}/a/log", f"checkpoint.dir={d}/a/ckpt", "checkpoint.interval=8",
          "logging.tensorboard=false"], d)
    return {"dir": d, "shards": shards, "ckpt": str(d / "a" / "ckpt"),
            "step": str(d / "a" / "ckpt" / "step_00000008"), "losses": [r["loss"] for r in _metrics(d / "a" / "log")]}


@pytest.mark.slow
def test_continue_at_4x_length_with_cp2(source):
    d = source["dir"]
    out = _run(_torchrun(2) + [
        os.path.join(ROOT, "launch", "pretrain.py"), "--config", TINY,
        f"data.datasets=[{source['shards']}]", "data.validation_fraction=0", "data.packing=keep_whole",
        "parallel.context=2", "train.steps=6", f"train.seq_len={LONG}", f"model.seq_len={LONG}",
        "train.global_batch=2", "train.micro_batch=1", "train.warmup_steps=3", "train.lr=3e-3",
        "eval.interval=0", "logging.interval=1", f"logging.dir={d}/b/log", "logging.tensorboard=false",
        f"checkpoint.dir={d}/b/ckpt", "checkpoint.interval=0",
        f"checkpoint.init_from={source['ckpt']}", "checkpoint.init_optimizer=keep"], d)
    assert f"[init_from] weights from {source['step']} (dcp, step 8" in out, out[-3000:]
    assert "optimizer keep; schedule restarts at step 0 with 3 warmup steps" in out
    assert "resumed from" not in out
    recs = _metrics(d / "b" / "log")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]  # the step counter restarted
    lr = [r["lr"] for r in recs]
    assert lr[0] == pytest.approx(3e-3 / 3) and lr[1] == pytest.approx(2 * 3e-3 / 3)  # re-warmup
    assert lr[2] == pytest.approx(3e-3) and lr[5] < lr[2]
    assert all(r["tokens"] == (i + 1) * 2 * LONG for i, r in enumerate(recs))  # 4× longer sequences
    loss = [r["loss"] for r in recs]
    assert all(math.isfinite(x) for x in loss), loss
    # the weights are the trained ones (a fresh tiny model starts at about ln 257 = 5.55) ...
    assert loss[0] < source["losses"][0] - 0.5, (loss, source["losses"])
    # ... and keep learning at the new length
    assert sum(loss[-2:]) / 2 < sum(loss[:2]) / 2, loss


def _exact_load_worker(rank, world, cfg_overrides, reference_path, sources):
    import torch

    from mdn_scale.model.sharding import gather_full_state_dict
    from mdn_scale.train.config import load_config
    from mdn_scale.train.distributed import init_distributed
    from mdn_scale.train.init_from import initialize
    from mdn_scale.train.trainer import build_model

    reference = torch.load(reference_path, weights_only=True)
    layout = None
    for src in sources:
        cfg = load_config(TINY, cfg_overrides + [f"checkpoint.init_from={src}"])
        if layout is None:
            layout = init_distributed(tensor=cfg.parallel.tensor, pipeline=1, context=cfg.parallel.context)
        torch.manual_seed(100 + rank)  # whatever the fresh init, the loaded weights must win
        model = build_model(cfg, layout)
        info = initialize(cfg, model, None, log=lambda *a: None)
        full = gather_full_state_dict(model)
        assert sorted(full) == sorted(reference), src
        for k, v in reference.items():
            assert torch.equal(full[k], v.to(full[k].dtype)), (src, info["format"], k)
    from mdn_scale.train.checkpoint import CheckpointError
    from mdn_scale.train.optimizer import build_optimizer

    # The padded vocabulary does not depend on the TP size: Adam moments follow to TP = 2.
    keep = [f"checkpoint.init_from={sources[0]}", "checkpoint.init_optimizer=keep"]
    cfg = load_config(TINY, cfg_overrides + keep)
    model = build_model(cfg, layout)
    info = initialize(cfg, model, build_optimizer(model, cfg.train), log=lambda *a: None)
    assert info["optimizer"] == "keep"
    # Another padding (model.vocab_pad_multiple): weights resize, Adam moments are refused by name.
    cfg = load_config(TINY, cfg_overrides + keep + ["model.vocab_pad_multiple=512"])
    model = build_model(cfg, layout)
    try:
        initialize(cfg, model, build_optimizer(model, cfg.train), log=lambda *a: None)
    except CheckpointError as e:
        assert "pads the vocabulary to another size" in str(e)
    else:
        raise AssertionError("init_optimizer=keep across a vocabulary padding change was not refused")


@pytest.mark.slow
def test_exact_weights_from_ours_hf_and_canonical_under_tp2(source, tmp_path):
    """Our checkpoint (saved at TP=1) loaded at TP=2 and CP=... exact; the same weights exported
    to an HF folder and a canonical .safetensors load exactly too."""
    import torch
    from safetensors.torch import save_file

    from mdn_scale.model import ModelConfig
    from mdn_scale.model.convert import export_hf
    import yaml

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from convert_checkpoint import load_ours

    full = load_ours(source["step"], prefix="model/")
    ref = str(tmp_path / "ref.pt")
    torch.save(full, ref)
    cfg = ModelConfig.from_dict(yaml.safe_load(open(TINY))["model"])
    export_hf(full, cfg, str(tmp_path / "hf"))
    save_file({k: v.contiguous() for k, v in full.items()}, str(tmp_path / "canon.safetensors"))
    overrides = ["parallel.tensor=2", f"train.seq_len={LONG}", f"model.seq_len={LONG}",
                 f"data.datasets=[{source['shards']}]", "checkpoint.dir=null"]
    run_workers(_exact_load_worker, 2, overrides, ref,
                [source["step"], source["ckpt"], str(tmp_path / "hf"), str(tmp_path / "canon.safetensors")])


def test_init_from_config_errors(source, tmp_path):
    import json as json_pkg

    from mdn_scale.model import ModelConfig
    from mdn_scale.train.config import ConfigError, load_config, validate
    from mdn_scale.train.init_from import check_same_architecture

    base = [f"data.datasets=[{source['shards']}]"]

    def check(*ov):
        validate(load_config(TINY, base + list(ov)), 1, has_cuda=False)

    check(f"checkpoint.init_from={source['ckpt']}", "checkpoint.init_optimizer=keep")  # fine
    with pytest.raises(ConfigError, match="checkpoint.init_from: no such file or folder"):
        check(f"checkpoint.init_from={tmp_path}/nothing")
    with pytest.raises(ConfigError, match="neither our checkpoints"):
        check(f"checkpoint.init_from={tmp_path}")
    with pytest.raises(ConfigError, match="init_optimizer = keep needs checkpoint.init_from"):
        check("checkpoint.init_optimizer=keep")
    with pytest.raises(ConfigError, match="load and checkpoint.init_from both given"):
        check(f"checkpoint.init_from={source['ckpt']}", f"checkpoint.load={source['ckpt']}")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json_pkg.dumps({"hidden_size": 64}))
    with pytest.raises(ConfigError, match="init_optimizer = keep needs a source in our checkpoint format"):
        check(f"checkpoint.init_from={tmp_path}/hf", "checkpoint.init_optimizer=keep")
    with pytest.raises(ConfigError, match="unknown|is not one of"):
        check("checkpoint.init_optimizer=maybe")
    a = ModelConfig(hidden_size=64, num_layers=2, num_heads=2, head_k_dim=16, vocab_size=257)
    b = ModelConfig(hidden_size=64, num_layers=3, num_heads=2, head_k_dim=16, vocab_size=257, seq_len=99)
    with pytest.raises(ConfigError, match=r"num_layers: x has 3, model: has 2"):
        check_same_architecture(a, b, "x")


@pytest.mark.slow
def test_eval_long_context_tables_and_plots(source, tmp_path):
    out_dir = tmp_path / "eval"
    out = _run(_torchrun(2) + [
        os.path.join(ROOT, "tools", "eval_long_context.py"), "--config", TINY, "--weights", source["ckpt"],
        "--out", str(out_dir), "--passkey-lengths", "128", "256", "--depths", "0.2", "0.8",
        "--trials", "2", "--position-sequences", "2", "--shards", source["shards"],
        "parallel.context=2", f"train.seq_len={LONG}", f"model.seq_len={LONG}",
        f"data.datasets=[{source['shards']}]", "data.packing=keep_whole"], tmp_path)
    for name in ("passkey.csv", "passkey.md", "passkey.png", "loss_by_position.csv",
                 "loss_by_position.md", "loss_by_position.png", "results.json"):
        assert (out_dir / name).is_file(), (name, out[-2000:])
    for png in ("passkey.png", "loss_by_position.png"):
        assert (out_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(open(out_dir / "passkey.csv")))
    assert [(int(r["length"]), float(r["depth"])) for r in rows] == [(128, 0.2), (128, 0.8), (256, 0.2), (256, 0.8)]
    assert all(0 <= float(r["accuracy"]) <= 1 and math.isfinite(float(r["mean_loglik"])) for r in rows)
    by_pos = json.load(open(out_dir / "results.json"))["loss_by_position"]
    assert [(r["from"], r["to"]) for r in by_pos][:3] == [(0, 1), (1, 2), (2, 4)] and by_pos[-1]["to"] == LONG
    assert sum(r["tokens"] for r in by_pos) > LONG  # 2 sequences per rank's replica, padding excluded
    assert all(math.isfinite(r["loss"]) for r in by_pos if r["tokens"])
    assert (out_dir / "passkey.md").read_text().startswith("| length | depth | trials | accuracy | mean_loglik |")
