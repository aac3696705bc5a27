"""tools/check_cp_kernels_gpu.py (the CP op alone with the model's dtypes against float64; the GPU
triage of session 6's machine-dependent CP fault) on CPU: two real gloo processes under torchrun,
the Triton kernels under the interpreter, a small shape with a document across the boundary and
several groups per rank. Its own logic (the slicing, the gather, the references) must give CP
within bf16 rounding of CP = 1; bad --docs must be refused by name."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
SCRIPT = os.path.join(ROOT, "tools", "check_cp_kernels_gpu.py")


def _run(args, nproc=None):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable]
    if nproc:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.run(cmd + [SCRIPT] + args, env=env, capture_output=True, text=True,
                          timeout=600)


def test_cp2_matches_float64_within_bf16_rounding():
    # two --no-wgmma choices: one RESULT line each (the interpreter has no MMA, so they agree)
    run = _run(["--T", "256", "--H", "1", "--K", "32", "--V", "32", "--C", "16",
                "--group-chunks", "2", "--docs", "0,50,150", "--no-wgmma", "none",
                "--no-wgmma", "state_bwd+group_map"], nproc=2)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    line = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")]
    assert len(line) == 2, run.stdout[-3000:]
    results = [json.loads(x[len("RESULT "):]) for x in line]
    assert [r["no_wgmma"] for r in results] == ["none", "state_bwd+group_map"]
    for res in results:
        assert res["world"] == 2 and res["docs"] == [0, 50, 150]
        for name, e in res["errors"].items():
            assert e["nonfinite"] == 0, name
            # both are bf16-input results against float64: ~1e-2 here; CP may not add more than half
            assert 1e-4 < e["cp1"] < 5e-2, (name, e)
            assert e["cp"] <= 1.5 * e["cp1"] + 1e-3, (name, e)
    assert results[0]["errors"] == results[1]["errors"]


def test_bad_docs_refused_by_name():
    run = _run(["--T", "64", "--docs", "5,10"])
    assert run.returncode != 0 and "--docs must start at 0" in run.stderr
