"""tools/summarize_model_bench.py on a suite call's folder (JOB/result.json per job, as the
per-kind plans' summary job reads it), built from session 17's real results: every job keeps its
own row (they are all named result.json), and the peer, CP and PP pairings are found."""
import json
import shutil
from pathlib import Path

from tool_loader import load_tool

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
JOBS = {"mdn_1p3b_4k": "model_h200x2_mdn_1p3b_4k_v17.json",
        "mdn_1p3b_8k_cp2": "model_h200x2_mdn_1p3b_8k_cp2_v17.json",
        "mdn_1p3b_4k_tp2_sp": "model_h200x2_mdn_1p3b_4k_tp2_sp_v17.json",
        "gdn_1p3b_4k_tp2_sp": "model_h200x2_gdn_1p3b_4k_tp2_sp_v17.json",
        "mdn_1p3b_24l_pp1": "model_h200x2_mdn_1p3b_24l_pp1_v17.json",
        "mdn_1p3b_24l_pp2_1f1b": "model_h200x2_mdn_1p3b_24l_pp2_1f1b_v17.json"}


def test_suite_folder(tmp_path, capsys):
    sm = load_tool("summarize_model_bench")
    for job, name in JOBS.items():
        (tmp_path / job).mkdir()
        shutil.copy(RESULTS / name, tmp_path / job / "result.json")
    (tmp_path / "kernels").mkdir()   # another tool's result.json is left out
    (tmp_path / "kernels" / "result.json").write_text(json.dumps({"shapes": []}))
    sm.main([str(tmp_path), "--json", str(tmp_path / "summary.json")])
    s = json.loads((tmp_path / "summary.json").read_text())
    assert sorted(r["name"] for r in s["rows"]) == sorted(JOBS)
    assert [(p["name"], p["vs"]) for p in s["peers"]] == [("mdn_1p3b_4k_tp2_sp", "gdn_1p3b_4k_tp2_sp")]
    assert abs(s["peers"][0]["ratio"] - 13427 / 18061) < 1e-3
    (cp,) = s["cp_weak"]
    assert (cp["name"], cp["vs"]) == ("mdn_1p3b_8k_cp2", "mdn_1p3b_4k") and abs(cp["efficiency"] - 0.768) < 1e-3
    (pp,) = s["pipeline"]
    assert (pp["name"], pp["vs"]) == ("mdn_1p3b_24l_pp2_1f1b", "mdn_1p3b_24l_pp1")
    assert pp["loss_max_rel_diff"] < 1e-7
    assert "mdn_1p3b_8k_cp2" in capsys.readouterr().out
