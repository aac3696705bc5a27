"""tools/bench_cp.py: its arguments, its refusal without CUDA, and its whole logic on CPU
(--cpu-smoke: 2 gloo ranks through torchrun, tiny shapes) so that the GPU run does not fail on
a bug that CPU could have shown."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tool_loader import load_tool

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "bench_cp.py"
TINY = ["--heads", "2", "--dk", "8", "--dv", "16", "--chunk-size", "16", "--weak-tokens", "32",
        "--strong-tokens", "64", "--exact-tokens", "64"]


def run(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def test_arguments():
    bench_cp = load_tool("bench_cp")
    a = bench_cp.parse_args(["--out", "x.json", "--modes", "ring", "--skip", "strong,fla"])
    assert a.modes == ["ring"] and a.skip == {"strong", "fla"} and a.weak_tokens == 32768
    for bad in (["--modes", "tree"], ["--skip", "everything"], ["--heads", "0"], []):
        with pytest.raises(SystemExit):
            bench_cp.parse_args((["--out", "x.json"] if bad else []) + bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_refuses_without_cuda(tmp_path):
    r = run(str(SCRIPT), "--out", str(tmp_path / "r.json"))
    assert r.returncode != 0 and "needs CUDA" in r.stderr


# torch.profiler (Kineto) in a process that also runs Triton's interpreter sometimes aborts that
# process at interpreter exit, after the tool has finished and written its results: "terminate
# called without an active exception" (torch 2.13.0+cpu; 2 of 10 runs under pytest, 1 of 8 run by
# hand with TRITON_INTERPRET=1, none of 16 without it and none of 12 without --profile). Not ours
# to fix; the run is retried once on exactly that failure, any other failure fails the test.
TEARDOWN_ABORT = "terminate called without an active exception"


@pytest.mark.slow
def test_cpu_smoke_two_ranks(tmp_path):
    out = tmp_path / "r.json"
    prof = tmp_path / "profile.txt"
    args = ("-m", "torch.distributed.run", "--nproc-per-node", "2", str(SCRIPT), "--cpu-smoke",
            "--out", str(out), "--profile", str(prof), "--profile-steps", "1", *TINY)
    r = run(*args)
    if r.returncode != 0 and TEARDOWN_ABORT in r.stderr and '"results"' in r.stdout:
        out.unlink(missing_ok=True)
        prof.unlink(missing_ok=True)
        r = run(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["num_gpus"] == 2 and rec["command"].startswith("torchrun --nproc-per-node 2")
    res = rec["results"]
    for mode in ("allgather", "ring"):
        for name, errs in res["exact"][mode].items():
            # bf16 CP = 2 against bf16 CP = 1: no larger than the op's own bf16 rounding
            assert errs["cp_vs_cp1"] <= errs["cp1_vs_fp32"], (mode, name, errs)
        for sec in ("weak", "strong"):
            assert res[sec][mode]["median_ms"] > 0 and res[sec][mode]["efficiency"] > 0
            assert res[sec][mode]["efficiency_vs_mode0"] > 0
        for sec in ("weak", "strong"):
            assert res[sec]["cp1_mode0"]["median_ms"] > 0
    table = prof.read_text()
    for run_name in ("CP=1", "CP=2 allgather", "CP=2 ring"):
        assert run_name in table and run_name in " ".join(res["profile"])
    assert "Self CPU time total" in table and "CPStatePass" in table
