"""tools/bench_state_pairs.py on CPU (--cpu-smoke: TRITON_INTERPRET=1, tiny shape): every launch
config runs, including ones with blocks larger than K or V, makes the W-making pass's pairs to
float rounding, and the JSON names its card as a smoke run."""
import json

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
