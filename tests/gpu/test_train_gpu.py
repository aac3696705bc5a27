"""The trainer on GPUs (NCCL): what the CPU suite cannot run — pipeline parallelism (Megatron's
1F1B schedule), sequence parallelism, bf16 autocast, and a PP=2 checkpoint resumed under TP=2.
Written on a machine without a GPU: not yet run at the time of writing.

Each case runs `torchrun launch/pretrain.py` on the tiny config (3 steps, real shards of the json
package's sources) and compares the loss curve with one GPU's."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run tests/gpu on the lent device")]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 3
needs_2 = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    import json as json_pkg

    from mdn_scale.data import make_shards

    out = tmp_path_factory.mktemp("shards") / "json_pkg"
    make_shards([os.path.dirname(json_pkg.__file__)], str(out), progress=False)
    return str(out)


def train(shards, run_dir, nproc, *overrides):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           os.path.join(ROOT, "launch", "pretrain.py"), "--config", os.path.join(ROOT, "configs", "tiny.yaml"),
           f"data.datasets=[{shards}]", "data.validation_fraction=0", f"train.steps={STEPS}",
           "train.global_batch=4", "train.micro_batch=2", "train.warmup_steps=1", "eval.interval=0",
           "logging.interval=1", f"logging.dir={run_dir}", "checkpoint.interval=0",
           f"checkpoint.dir={run_dir}/ckpt",
           "model.vocab_size=384", "model.vocab_pad_multiple=64",  # padded vocab 384 at TP 1 and 2
           *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return metric(run_dir, "loss")


def metric(run_dir, key):
    out = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        rec = json.loads(line)
        if key in rec:
            out[rec["step"]] = rec[key]
    return out


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    return train(shards, str(tmp_path_factory.mktemp("ref")), 1)


@needs_2
@pytest.mark.parametrize("name, overrides", [
    ("pp2", ["parallel.pipeline=2"]),
    ("tp2_sp", ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    ("cp2", ["parallel.context=2"]),
    ("dp2", []),
])
def test_layout_matches_one_gpu(shards, reference, tmp_path, name, overrides):
    losses = train(shards, str(tmp_path), 2, *overrides)
    assert losses.keys() == reference.keys()
    for s in reference:
        assert losses[s] == pytest.approx(reference[s], rel=1e-5), (name, losses, reference)


def test_recompute_offload_matches_recompute_bf16(shards, tmp_path):
    """train.recompute_offload on CUDA (pinned host copies, asynchronous copies on the compute
    stream, autocast restored in the backward): the same bf16 losses as plain recompute. The
    CPU suite checks the same in fp32 (tests/train/test_train_equivalence.py); session 10 saw
    bitwise-equal losses of the 1.3B at 64K tokens on an H200 (BENCHMARKS.md)."""
    common = ["train.precision=bf16", "train.recompute=true"]
    plain = train(shards, str(tmp_path / "plain"), 1, *common)
    offload = train(shards, str(tmp_path / "offload"), 1, *common, "train.recompute_offload=true")
    assert offload.keys() == plain.keys()
    for s in plain:
        assert offload[s] == pytest.approx(plain[s], rel=1e-6), (offload, plain)


def test_bf16_close_to_fp32(shards, reference, tmp_path):
    losses = train(shards, str(tmp_path), 1, "train.precision=bf16")
    for s in reference:
        assert losses[s] == pytest.approx(reference[s], rel=2e-2), (losses, reference)


@needs_2
def test_pp2_checkpoint_resumes_under_tp2(shards, reference, tmp_path):
    ck = tmp_path / "ckpt"
    train(shards, str(tmp_path / "pp2"), 2, "parallel.pipeline=2", f"checkpoint.dir={ck}",
          "checkpoint.interval=2")
    shutil.rmtree(ck / f"step_{STEPS:08d}")
    losses = train(shards, str(tmp_path / "tp2"), 2, "parallel.tensor=2", f"checkpoint.dir={ck}",
                   "checkpoint.interval=2")
    assert list(losses) == [STEPS]
    assert losses[STEPS] == pytest.approx(reference[STEPS], rel=1e-5)


@needs_2
def test_pp2_bf16_matches_one_gpu(shards, tmp_path):
    """PP = 2 under bf16 autocast: the stages send bf16 activations; with fp32 receive buffers
    (config.pipeline_dtype = the params' dtype) the schedule hung in its first step (sessions 6
    and 7, BENCHMARKS.md). Losses within bf16 rounding of the same run on one GPU."""
    one = train(shards, str(tmp_path / "one"), 1, "train.precision=bf16")
    pp2 = train(shards, str(tmp_path / "pp2"), 2, "parallel.pipeline=2", "train.precision=bf16")
    assert pp2.keys() == one.keys()
    for s in one:
        assert pp2[s] == pytest.approx(one[s], rel=2e-2), (pp2, one)


@needs_2
def test_tp2_sp_bf16_matches_one_gpu(shards, tmp_path):
    """TP = 2 with sequence parallelism under bf16 autocast over fp32 weights: layer 0's input
    norm sees the fp32 embedding, and Megatron's SP column linear reduce-scatters its input
    gradient into a buffer of its input's dtype; with the norm handing on fp32 the first
    backward failed ("input tensor must be the same type as the output tensor", session 17,
    plan s17x2). Losses within bf16 rounding of the same run on one GPU."""
    one = train(shards, str(tmp_path / "one"), 1, "train.precision=bf16")
    tp2 = train(shards, str(tmp_path / "tp2"), 2, "parallel.tensor=2",
                "parallel.sequence_parallel=true", "train.precision=bf16")
    assert tp2.keys() == one.keys()
    for s in one:
        assert tp2[s] == pytest.approx(one[s], rel=2e-2), (tp2, one)


@needs_2
def test_pp2_validation_matches_one_gpu(shards, tmp_path):
    """Validation under PP = 2 (Megatron's forward-only schedule, step.evaluate; refused by the
    config before session 17): every step's val_loss equals one GPU's (fp32). CPU check of the
    same path: tests/model/test_model_pp.py::test_evaluate_under_pipeline_matches_pp1."""
    common = [f"data.valid_datasets=[{shards}]", "eval.interval=1", "eval.batches=2"]
    train(shards, str(tmp_path / "one"), 1, *common)
    train(shards, str(tmp_path / "pp2"), 2, "parallel.pipeline=2", *common)
    one, pp2 = metric(str(tmp_path / "one"), "val_loss"), metric(str(tmp_path / "pp2"), "val_loss")
    assert one.keys() == pp2.keys() == set(range(1, STEPS + 1)), (one, pp2)
    for s in one:
        assert pp2[s] == pytest.approx(one[s], rel=1e-5), (pp2, one)
