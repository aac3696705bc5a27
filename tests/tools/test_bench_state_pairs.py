"""tools/bench_state_pairs.py on CPU (--cpu-smoke: TRITON_INTERPRET=1, tiny shape): every launch
config runs, including ones with blocks larger than K or V, makes the W-making pass's pairs to
float rounding, and the JSON names its card as a smoke run."""
import json

import pytest

from tool_loader import load_tool


def test_every_config_makes_the_w_making_pass_pairs(tmp_path):
    tool = load_tool("bench_state_pairs")
    out = tmp_path / "s.json"
    tool.main(["--cpu-smoke", "--out", str(out)])
    res = json.loads(out.read_text())
    assert "smoke" in res["meta"]["card"]
    rows = res["rows"]
    assert [r["config"] for r in rows] == ["default"] + tool.CONFIGS[1:]
    for r in rows:
        assert "error" not in r, r
        assert r["rel_diff_to_w_making_pass"] < 1e-5, r
    # the "fwd" row runs the W-making kernel's blocks: the same products, bitwise
    assert rows[1]["rel_diff_to_w_making_pass"] == 0.0


def test_the_other_state_kernels_sweep(tmp_path):
    """--kernel state_fwd / state_bwd: each config's results against the defaults' (other value
    blocks: only the interpreter's numpy rounding of sub-blocks differs), and a config the kernel
    does not take is recorded as an error that names it, not a crash."""
    tool = load_tool("bench_state_pairs")
    for kernel in ("state_fwd", "state_bwd"):
        out = tmp_path / f"{kernel}.json"
        tool.main(["--cpu-smoke", "--kernel", kernel, "--configs", ";BV=16;BV=32,num_warps=8;BK=16",
                   "--out", str(out)])
        rows = json.loads(out.read_text())["rows"]
        assert [r["config"] for r in rows] == ["default", "BV=16", "BV=32,num_warps=8", "BK=16"]
        for r in rows[:3]:
            assert r["kernel"] == kernel and r["rel_diff_to_default"] < 1e-5, r
        assert rows[0]["rel_diff_to_default"] == 0.0
        assert "takes" in rows[3]["error"], rows[3]


@pytest.mark.parametrize("kernel,diff_key", [("state_bwd", "rel_diff_to_default"),
                                             ("state_fwd", "rel_diff_to_default"),
                                             ("state_pairs", "rel_diff_to_w_making_pass")])
def test_the_factored_passes_beside_the_default(kernel, diff_key, tmp_path):
    """--kernel <pass>_kfac: the default pass at its defaults first, then the pass with its
    operands as factors at each config, on operands made from the same factors: its results
    differ from the default's by bf16 rounding only (other rounding points), not more."""
    tool = load_tool("bench_state_pairs")
    out = tmp_path / "kfac.json"
    blocks = "BK=16,BV=16" if kernel == "state_pairs" else "BV=16"
    tool.main(["--cpu-smoke", "--kernel", f"{kernel}_kfac", "--configs", f";{blocks}",
               "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kernel"], r["config"]) for r in rows] == [
        (kernel, "default"), (f"{kernel}_kfac", "default"), (f"{kernel}_kfac", blocks)]
    if kernel != "state_pairs":   # the pairs' default row is already the W-making pass's
        assert rows[0][diff_key] == 0.0
    for r in rows[1:]:
        assert "error" not in r, r
        assert 0 < r[diff_key] < 3e-2, r
