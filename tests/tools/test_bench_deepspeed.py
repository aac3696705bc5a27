"""tools/bench_deepspeed.py: its arguments, how it packs cases onto GPUs, and its whole logic on
CPU (--cpu-smoke: torchrun of launch/pretrain.py per case, gloo, the tiny model, two cases side
by side, an existing JSON extended), so that the GPU run does not fail on a bug CPU could show."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tool_loader import load_tool

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "bench_deepspeed.py"


@pytest.fixture(scope="module")
def bench():
    return load_tool("bench_deepspeed")


def test_arguments(bench):
    a = bench.parse_args(["--out", "x.json", "--cases", "megatron_1,ds_z3_2"])
    assert a.cases == ["megatron_1", "ds_z3_2"] and a.precision == "bf16" and a.seq_len == 4096
    assert bench.parse_args(["--out", "x.json", "--cpu-smoke"]).precision == "fp32"
    for bad in (["--cases", "zero9"], ["--steps", "2", "--warmup", "2"],
                ["--global-batch", "6", "--micro-batch", "4"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--out", "x.json", *bad])


def test_cases_are_packed_onto_disjoint_gpus_in_waves(bench):
    names = ["megatron_1", "ds_z3_offload_1", "ds_z3_offload_cpuadam_1", "ds_z3_1",
             "megatron_2", "ds_z3_2", "megatron_4", "ds_z3_4"]
    waves, skipped = bench.plan_waves(names, 4, sequential=False)
    assert skipped == {}
    assert waves == [[("megatron_1", [0]), ("ds_z3_offload_1", [1]), ("ds_z3_offload_cpuadam_1", [2]),
                      ("ds_z3_1", [3])],
                     [("megatron_2", [0, 1]), ("ds_z3_2", [2, 3])],
                     [("megatron_4", [0, 1, 2, 3])], [("ds_z3_4", [0, 1, 2, 3])]]
    waves, skipped = bench.plan_waves(["megatron_1", "ds_z3_2", "megatron_4"], 2, sequential=False)
    assert waves == [[("megatron_1", [0])], [("ds_z3_2", [0, 1])]] and list(skipped) == ["megatron_4"]
    waves, _ = bench.plan_waves(["megatron_1", "ds_z3_1"], 4, sequential=True)
    assert waves == [[("megatron_1", [0])], [("ds_z3_1", [0])]]


@pytest.mark.slow
def test_cpu_smoke_runs_cases_side_by_side_and_extends_the_json(tmp_path):
    pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")
    out = tmp_path / "r" / "bench.json"
    common = [str(SCRIPT), "--out", str(out), "--cpu-smoke", "--slots", "2",
              "--model-config", str(ROOT / "configs" / "tiny.yaml"), "--data", str(tmp_path / "data"),
              "--seq-len", "64", "--global-batch", "4", "--steps", "3", "--warmup", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, *common, "--cases", "megatron_1,ds_z3_offload_1,megatron_4"],
                       capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # a second phase: extends the file; a deadline already passed starts no case
    r = subprocess.run([sys.executable, *common, "--cases", "ds_z3_2", "--deadline", "1"],
                       capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("card", "versions", "command", "date_utc", "git_commit"):
        assert key in report, key
    assert len(report["invocations"]) == 2 and "--deadline" in report["command"]
    res = report["results"]
    assert res["megatron_4"] == {"skipped": "needs 4 GPUs, the machine has 2"}
    assert "deadline" in res["ds_z3_2"]["skipped"]
    for name in ("megatron_1", "ds_z3_offload_1"):
        case = res[name]
        assert case["rc"] == 0, case["log_tail"]
        assert case["steps_logged"] == 3 and len(case["step_times_s"]) == 2
        assert case["tokens_per_s"] == pytest.approx(4 * 64 / case["step_time_s"])
        assert case["host_rss_peak_gb_rank0"] > 0 and case["timeout_s"] == 540
        assert case["concurrent_with"] == [n for n in ("megatron_1", "ds_z3_offload_1") if n != name]
        assert (out.parent / f"{name}.log").exists()
    assert {c["devices"][0] for c in (res["megatron_1"], res["ds_z3_offload_1"])} == {0, 1}
    # same init, data and update (torch AdamW; fp32): the backends' first losses agree
    assert res["megatron_1"]["losses"]["1"] == pytest.approx(res["ds_z3_offload_1"]["losses"]["1"], rel=1e-6)
