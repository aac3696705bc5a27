"""tools/profiling.py's sync_sites: the host syncs of one call counted by code site. The sync
debug mode itself needs CUDA (its GPU use: tools/bench_model.py --sync-report in suite plan
s18x4d); here its warnings are raised by hand, with the mode's switch stubbed, so the counting,
the site names and the restoring of the warning hooks run on the CPU."""
import warnings

import pytest
import torch

from tool_loader import load_tool

profiling = load_tool("profiling")
SYNC = "called a synchronizing CUDA operation"


def _copy_to_host():                 # stands in for a .tolist() of a device tensor
    warnings.warn(SYNC, UserWarning)


def _helper():                       # a shared helper: its caller must show in the site
    _copy_to_host()


@pytest.fixture
def stub_mode(monkeypatch):
    modes = []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    return modes


def test_sync_sites_counts_by_the_two_innermost_own_frames(stub_mode):
    def step():
        for _ in range(3):
            _helper()
        _copy_to_host()
        warnings.warn("something else", UserWarning)   # not a sync: not counted

    hook = warnings.showwarning
    sites = profiling.sync_sites(step)
    assert sum(sites.values()) == 4, sites
    (top, n_top), (other, n_other) = sites.items()
    assert (n_top, n_other) == (3, 1)
    assert "_copy_to_host <- " in top and "_helper" in top, top
    assert "_copy_to_host <- " in other and "step" in other, other
    assert top.startswith("tools/test_profiling.py:") or "test_profiling.py" in top, top
    assert stub_mode == ["warn", 0]          # on, then back to what it was
    assert warnings.showwarning is hook


def test_sync_sites_restores_the_mode_when_the_step_fails(stub_mode):
    def step():
        _copy_to_host()
        raise RuntimeError("boom")

    hook = warnings.showwarning
    with pytest.raises(RuntimeError, match="boom"):
        profiling.sync_sites(step)
    assert stub_mode == ["warn", 0] and warnings.showwarning is hook


def test_bench_model_refuses_sync_report_on_cpu(capsys):
    bench = load_tool("bench_model")
    with pytest.raises(SystemExit):
        bench.parse_args(["--cpu-smoke", "--out", "/tmp/x.json", "--sync-report", "/tmp/s.json"])
    assert "--sync-report needs CUDA" in capsys.readouterr().err


def test_profile_summary_counts_each_kernel_once():
    """The device spans of record_function ranges (kineto's GPU user annotations) cover kernels
    that are reported on their own too: they are left out of GPU-busy time, and NCCL kernels
    go to gpu_comm_ms."""
    from types import SimpleNamespace as NS

    from torch.autograd import DeviceType

    def ev(name, us, device=DeviceType.CUDA, annotation=False):
        return NS(name=name, self_device_time_total=us, device_type=device, is_user_annotation=annotation)

    events = [ev("bench.forward_backward", 900.0, annotation=True), ev("mdn.op", 300.0, annotation=True),
              ev("_state_fwd_kernel", 300.0), ev("nvjet_gemm", 400.0),
              ev("ncclDevKernel_AllGather_RING_LL", 200.0), ev("aten::mm", 0.0, device=DeviceType.CPU)]
    prof = NS(events=lambda: events, key_averages=lambda: [NS(self_cpu_time_total=5000.0)])
    s = profiling.profile_summary(prof, steps=2)
    assert s == {"gpu_busy_ms": 0.45, "gpu_comm_ms": 0.1, "gpu_compute_ms": 0.35,
                 "device_events": 1.5, "cpu_self_ms": 2.5}, s



def test_op_sites_by_line_and_backward_node():
    """op_sites: each op's time by the line of our code that called it (the eager block norm's
    products, mdn_scale/model/norm.py), and the ops the autograd engine ran by their backward
    node; calls are per step."""
    from mdn_scale.model.norm import rms_norm

    x = torch.randn(64, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    prof, _ = profiling.profile_steps(lambda: rms_norm(x, w, 1e-6).sum().backward(), 2,
                                      cuda=False, stacks=True)
    lines = profiling.op_sites(prof, cuda=False, top=200, steps=2)
    assert lines[0].startswith("top 200 ops by call site (self CPU ms")
    fwd = [r for r in lines if " aten::mul " in r and "mdn_scale/model/norm.py:" in r]
    assert fwd and all(r.endswith(" rms_norm") for r in fwd)
    assert sum(float(r.split()[1]) for r in fwd) >= 2.0        # y·rstd and ·w, per step
    assert any(" aten::mul " in r and r.endswith("backward: MulBackward0") for r in lines)
