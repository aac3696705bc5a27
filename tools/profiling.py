"""torch.profiler helpers shared by the benchmark scripts (tools/bench_cp.py, tools/bench_model.py).

profile_steps(fn, steps, cuda): run `fn` `steps` times under torch.profiler (CPU and, on CUDA,
device activity); returns (profiler, wall ms per step).
profile_summary(prof, steps): per step, GPU-busy ms (the sum of the device events' self time:
kernels, copies), the number of device events (kernel launches, copies, collectives) and the
self CPU ms of the ops.
profile_tables(prof, cuda, rows): the key_averages tables, by self CUDA time (on CUDA) and by
self CPU time.
"""
from __future__ import annotations

import time

import torch


def profile_steps(fn, steps: int, cuda: bool):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / steps
    return prof, wall


def profile_summary(prof, steps: int) -> dict:
    from torch.autograd import DeviceType

    dev = [e for e in prof.events() if e.device_type != DeviceType.CPU]
    cpu_self = sum(e.self_cpu_time_total for e in prof.key_averages())
    return {"gpu_busy_ms": sum(e.self_device_time_total for e in dev) / 1e3 / steps,
            "device_events": len(dev) / steps,
            "cpu_self_ms": cpu_self / 1e3 / steps}


def profile_tables(prof, cuda: bool, rows: int = 40, width: int = 70) -> list[str]:
    ka = prof.key_averages()
    out = []
    if cuda:
        out += [f"top {rows} by self CUDA time (totals over the profiled steps)",
                ka.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=width)]
    out += [f"top {rows} by self CPU time (totals over the profiled steps)",
            ka.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=width)]
    return out
