"""tools/bench_model.py on GPUs: what its CPU test cannot run — Megatron-core's GatedDeltaNet
peer (FLA kernels, CUDA parameters) and pipeline parallelism (Megatron's 1F1B and interleaved
schedules, whose losses must equal PP = 1's on the same seed and data). Small models, fp32 for
the loss comparison. Written on a machine without a GPU: not yet run at the time of writing."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run tests/gpu on the lent device")]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tools", "bench_model.py")
TINY = ["--config", os.path.join(ROOT, "configs", "tiny.yaml"), "--seq-len", "256", "--steps", "3",
        "--warmup", "1"]
needs_2 = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


def bench(tmp_path, nproc, *args):
    out = tmp_path / f"r{len(list(tmp_path.iterdir()))}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           SCRIPT, "--out", str(out), *TINY, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    rec = json.loads(out.read_text())
    assert all(x == x for x in rec["losses"]) and rec["tokens_per_s_per_gpu"] > 0
    assert rec["peak_memory_gib"] > 0 and 0 < rec["mfu"] < 1
    return rec


def test_megatron_gdn_peer(tmp_path):
    pytest.importorskip("fla", reason="Megatron's GatedDeltaNet needs fla (flash-linear-attention)")
    rec = bench(tmp_path, 1, "--mixer", "megatron_gdn", "--micro-batch", "2", "--precision", "bf16")
    assert rec["mixer"] == "megatron_gdn" and rec["fla_guard_lifted"] in (True, False)
    # the same sizes as our gdn layer: parameter counts within the in-projection's gate rows
    ours = bench(tmp_path, 1, "--mixer", "gdn", "--micro-batch", "2", "--precision", "bf16")
    assert abs(rec["params_counted"] - ours["params_counted"]) < 0.05 * ours["params_counted"]


@needs_2
@pytest.mark.parametrize("vp", [1, 2])
def test_pipeline_losses_equal_pp1(tmp_path, vp):
    """PP = 2 with 1F1B (vp 1) and the interleaved schedule (vp 2) against PP = 1: same global
    batch of 4 microbatches, 4 layers, fp32."""
    common = ["--microbatches", "4", "--precision", "fp32", "model.num_layers=4"]
    ref = bench(tmp_path, 1, *common)
    pp = bench(tmp_path, 2, "--pp", "2", "--vp", str(vp), *common)
    assert pp["layout"]["schedule"] == ("interleaved 1F1B" if vp > 1 else "1F1B")
    assert pp["global_batch"] == ref["global_batch"]
    assert pp["losses"] == pytest.approx(ref["losses"], rel=1e-5)
    assert pp["warmup_losses"] == pytest.approx(ref["warmup_losses"], rel=1e-5)
