"""tools/ablate_state_bwd.py under the interpreter (--cpu-smoke): every cut and reordering finds
its statements in the reverse pass's current source and runs; the reorderings give the
kernel's results bit for bit."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
import ablate_state_bwd  # noqa: E402


def test_every_variant_builds_and_the_reorderings_match(tmp_path):
    out = tmp_path / "a.json"
    ablate_state_bwd.main(["--cpu-smoke", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {r["ablation"] for r in rows} == set(ablate_state_bwd.ABLATIONS)
    same = [r for r in rows if "max_rel_diff_to_kernel" in r]
    assert {r["ablation"] for r in same} == {"none", "early_loads", "gates_last"}
    assert all(r["max_rel_diff_to_kernel"] == 0.0 for r in same)
