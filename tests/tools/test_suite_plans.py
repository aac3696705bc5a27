"""benchmarks/suite.py's plans: within a phase the lanes use disjoint GPUs and no job's limit
exceeds its phase's; the per-kind plans (issue 9: one device call per machine kind) fit their
kind's GPUs and the call's default budget, and every plan prints its jobs in a dry run."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("suite_plans_under_test", ROOT / "benchmarks" / "suite.py")
suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(suite)

KINDS = {"h200": 1, "h200x2": 2, "h200x4": 4}
BUDGET_S = 570   # run_suite_gpu.sh's default BUDGET_S


@pytest.mark.parametrize("plan", sorted(suite.PLANS))
def test_lanes_disjoint_and_limits_nested(plan):
    for phase, limit, lanes in suite.PLANS[plan]:
        seen = set()
        for gpus, jobs in lanes:
            ids = {int(g) for g in gpus.split(",")}
            assert not ids & seen, (plan, phase, gpus)
            seen |= ids
            for name, job_limit, _ in jobs:
                assert job_limit <= limit, (plan, phase, name, job_limit, limit)


@pytest.mark.parametrize("kind, gpus", sorted(KINDS.items()))
def test_kind_plans_fit_their_machine(kind, gpus, tmp_path, capsys):
    phases = suite.PLANS[kind]
    assert sum(limit for _, limit, _ in phases) <= BUDGET_S, kind
    for _, _, lanes in phases:
        for lane_gpus, _ in lanes:
            assert max(int(g) for g in lane_gpus.split(",")) < gpus, (kind, lane_gpus)
    suite.main(["--plan", kind, "--out", str(tmp_path), "--dry-run"])
    out = capsys.readouterr().out
    assert out.count("dry-run") >= sum(len(jobs) for _, _, lanes in phases for _, jobs in lanes)
