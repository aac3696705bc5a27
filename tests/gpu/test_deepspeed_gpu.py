"""The DeepSpeed backend on GPUs (NCCL): ZeRO 2 / ZeRO 3 (+ offload) / CP = 2 against the Megatron
backend on one GPU, bf16, and a ZeRO 3 resume. Written on a machine without a GPU: not yet run.

Same runs as test_train_gpu.py (tiny config, 3 steps, real shards); same tolerances: fp32 layouts
rel 1e-5 (GPU reductions are not bitwise reproducible across layouts), bf16 rel 2e-2 of fp32."""

import json
import os
import shutil

import pytest
import torch

from tests.gpu.test_train_gpu import reference, shards, train  # noqa: F401 (fixtures)

pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
needs_2 = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
DS = ["train.backend=deepspeed"]


@needs_2
@pytest.mark.parametrize("name, overrides", [
    ("zero2_dp2", ["deepspeed.zero_stage=2"]),
    ("zero3_dp2", ["deepspeed.zero_stage=3"]),
    ("zero3_offload_dp2", ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true",
                           "deepspeed.offload_param=true"]),
    ("zero3_cp2", ["deepspeed.zero_stage=3", "parallel.context=2"]),
])
def test_deepspeed_matches_megatron_one_gpu(shards, reference, tmp_path, name, overrides):
    losses = train(shards, str(tmp_path), 2, *DS, *overrides)
    assert losses.keys() == reference.keys()
    for s in reference:
        assert losses[s] == pytest.approx(reference[s], rel=1e-5), (name, losses, reference)


def test_deepspeed_bf16_close_to_fp32(shards, reference, tmp_path):
    losses = train(shards, str(tmp_path), 1, *DS, "deepspeed.zero_stage=2", "train.precision=bf16")
    for s in reference:
        assert losses[s] == pytest.approx(reference[s], rel=2e-2), (losses, reference)


@needs_2
def test_zero3_resume_is_exact(shards, tmp_path):
    full = train(shards, str(tmp_path / "full"), 2, *DS, "deepspeed.zero_stage=3",
                 "checkpoint.interval=2")
    ckpt = tmp_path / "full" / "ckpt"
    shutil.rmtree(ckpt / "step_00000003")
    (ckpt / "latest").write_text("step_00000002\n")
    shutil.copytree(ckpt, tmp_path / "resumed" / "ckpt")
    resumed = train(shards, str(tmp_path / "resumed"), 2, *DS, "deepspeed.zero_stage=3",
                    "checkpoint.interval=2")
    assert list(resumed) == [3]
    assert resumed[3] == full[3]
