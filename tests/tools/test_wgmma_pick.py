"""benchmarks/wgmma_pick.py: the smallest MDN_NO_WGMMA choice right in every bisect log."""
from __future__ import annotations

import importlib.util
import json
import os

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
spec = importlib.util.spec_from_file_location("wgmma_pick", os.path.join(ROOT, "benchmarks", "wgmma_pick.py"))
pick = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pick)


def _log(path, rows):
    with open(path, "w") as f:
        f.write("noise before\n")
        for choice, cp, nonfinite in rows:
            errs = {n: dict(cp=cp, cp1=0.004, nonfinite=nonfinite) for n in ("o", "dk")}
            f.write("RESULT " + json.dumps(dict(no_wgmma=choice, errors=errs)) + "\n")
    return str(path)


def test_smallest_right_choice_in_every_log(tmp_path):
    a = _log(tmp_path / "k256.log", [("none", float("nan"), 5), ("all", 0.004, 0),
                                     ("state_bwd", 0.004, 0), ("state_fwd+state_bwd", 0.0041, 0)])
    b = _log(tmp_path / "k128.log", [("none", 0.007, 0), ("all", 0.004, 0),
                                     ("state_bwd", 0.0073, 0), ("state_fwd+state_bwd", 0.0042, 0)])
    # state_bwd alone fixes K = 256 but not K = 128 (1.8x CP = 1's error): the pair is needed
    assert pick.main([a, b]) == "state_fwd,state_bwd"
    assert pick.main([a]) == "state_bwd"


def test_right_machine_and_nothing_right(tmp_path):
    a = _log(tmp_path / "a.log", [("none", 0.0041, 0), ("state_bwd", 0.004, 0)])
    assert pick.main([a]) == "all"          # nothing to learn: validate the widest choice
    b = _log(tmp_path / "b.log", [("none", 0.01, 0), ("state_bwd", 0.01, 0)])
    assert pick.main([b]) == ""
