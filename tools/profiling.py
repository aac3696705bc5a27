"""torch.profiler helpers shared by the benchmark scripts (tools/bench_cp.py, tools/bench_model.py).

profile_steps(fn, steps, cuda): run `fn` `steps` times under torch.profiler (CPU and, on CUDA,
device activity); returns (profiler, wall ms per step).
profile_summary(prof, steps): per step, GPU-busy ms (the sum of the device events' self time:
kernels, copies; also split into NCCL kernels, gpu_comm_ms, which include the time spent
waiting for the other ranks, and the rest, gpu_compute_ms), the number of device events (kernel launches, copies, collectives) and the
self CPU ms of the ops.
profile_tables(prof, cuda, rows, ranges): the key_averages tables, by self CUDA time (on CUDA)
and by self CPU time; with `ranges` (name prefixes of record_function ranges, e.g. "mdn."), a
table of those ranges first (calls, CPU total and device total of the kernels inside them).
sync_sites(fn): run `fn` once with torch.cuda's sync debug mode on ("warn") and count where the
host synchronised with the device (every stream or device synchronisation, device→host copy or
pageable host→device copy torch makes), by the innermost frame of our or a library's code.
op_sites(prof, cuda, top): with a profile taken with_stack (profile_steps(..., stacks=True)),
the time of the ops (self device time on CUDA, else self CPU time) by op and call site: the
innermost frame of our or a library's model code, or, for an op the autograd engine ran outside
any Python frame, the backward node it ran in (else the innermost mdn.* / bench.* range: on the
GPU the profiler linked no Python frames to the forward's ops, plan s23a).
peak_breakdown(events, top): from a recorded CUDA allocator trace, the allocated-bytes peak and
what was live at that moment, grouped by the model-code line that allocated it.
"""
from __future__ import annotations

import re
import time

import torch


def profile_steps(fn, steps: int, cuda: bool, stacks: bool = False):
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, with_stack=stacks) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) * 1e3 / steps
    return prof, wall


def profile_summary(prof, steps: int) -> dict:
    from torch.autograd import DeviceType

    # Device events minus the GPU-side spans of record_function ranges (bench.forward_backward,
    # mdn.op, ...): kineto reports each range again on the device, over the kernels inside it,
    # so counting them summed every kernel twice or more (tools/bench_model.py's summaries up to
    # session 18 read ~2x their wall time).
    dev = [e for e in prof.events()
           if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False)]
    cpu_self = sum(e.self_cpu_time_total for e in prof.key_averages())
    # NCCL kernels spin on the GPU until every rank has reached the collective: their time is
    # mostly waiting for the slowest rank, not work. Reported apart so that a rank that waits
    # does not look busier than one that computes.
    comm = sum(e.self_device_time_total for e in dev if "nccl" in e.name.lower())
    return {"gpu_busy_ms": sum(e.self_device_time_total for e in dev) / 1e3 / steps,
            "gpu_comm_ms": comm / 1e3 / steps,
            "gpu_compute_ms": sum(e.self_device_time_total for e in dev
                                  if "nccl" not in e.name.lower()) / 1e3 / steps,
            "device_events": len(dev) / steps,
            "cpu_self_ms": cpu_self / 1e3 / steps}


def profile_tables(prof, cuda: bool, rows: int = 40, width: int = 70, ranges=()) -> list[str]:
    ka = prof.key_averages()
    out = []
    if ranges:
        picked = sorted((e for e in ka if e.key.startswith(tuple(ranges))), key=lambda e: e.key)
        out.append("ranges (record_function; totals over the profiled steps; device total = "
                   "kernels launched inside the range, forward only for model ranges)")
        out.append(f"{'name':<40} {'calls':>7} {'CPU total ms':>13} {'device total ms':>16}")
        for e in picked:
            out.append(f"{e.key:<40} {e.count:>7} {e.cpu_time_total / 1e3:>13.3f} "
                       f"{getattr(e, 'device_time_total', 0.0) / 1e3:>16.3f}")
    if cuda:
        out += [f"top {rows} by self CUDA time (totals over the profiled steps)",
                ka.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=width)]
    out += [f"top {rows} by self CPU time (totals over the profiled steps)",
            ka.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=width)]
    return out


# the benchmarks import the op as mdn_kernels (a link to kernels/ on the GPU machine)
OWN_CODE = ("/mdn_scale/", "/kernels/", "/mdn_kernels/", "/fla/", "/megatron/", "/benchmarks/", "/tools/")


def _site(frames) -> str:
    """The innermost frame of a Python stack that is ours or a library's model code (torch's own
    frames skipped): where an allocation came from, as 'path:line function'."""
    for fr in frames or ():
        fn = fr.get("filename", "")
        if any(p in fn for p in OWN_CODE):
            for p in OWN_CODE:
                if p in fn:
                    fn = p.strip("/") + "/" + fn.split(p, 1)[1]
                    break
            return f"{fn}:{fr.get('line')} {fr.get('name')}"
    return "(no model frame)"


_PY_FRAME = re.compile(r"^(.*)\((\d+)\): (.*)$")   # a Python frame's event: "file(line): name"
_BACKWARD = "autograd::engine::evaluate_function: "


def _op_site(e) -> str:
    """Where op event `e` was called from: its innermost enclosing Python frame of our or a
    library's model code (the profiler records frames as events around the ops, with_stack), or
    the backward node whose autograd-engine range encloses it."""
    p, scope = e.cpu_parent, None
    while p is not None:
        if p.name.startswith(_BACKWARD):
            return "backward: " + p.name[len(_BACKWARD):]
        if scope is None and p.name.startswith(("mdn.", "bench.")):
            scope = p.name   # the innermost record_function range, where no frame shows
        m = _PY_FRAME.match(p.name)
        # the profiler names frames by a path that may be relative (mdn_scale/model/...)
        path = "/" + m.group(1) if m else ""
        if m and any(q in path for q in OWN_CODE):
            return _site([{"filename": path, "line": m.group(2), "name": m.group(3)}])
        p = p.cpu_parent
    return f"range: {scope}" if scope else "(no model frame)"


def op_sites(prof, cuda: bool, top: int = 50, steps: int = 1) -> list[str]:
    """The ops' time by (op, call site), largest first, per step (see the module docstring)."""
    agg: dict = {}
    for e in prof.events():
        if not e.name.startswith("aten::"):
            continue
        t = e.self_device_time_total if cuda else e.self_cpu_time_total
        if t <= 0:
            continue
        key = (e.name, _op_site(e))
        calls, total = agg.get(key, (0, 0.0))
        agg[key] = (calls + 1, total + t)
    rows = sorted(agg.items(), key=lambda kv: -kv[1][1])[:top]
    what = "self device" if cuda else "self CPU"
    out = [f"top {top} ops by call site ({what} ms and calls per step)",
           f"{'ms':>9} {'calls':>7}  {'op':<28} site"]
    for (name, site), (calls, total) in rows:
        out.append(f"{total / 1e3 / steps:>9.3f} {calls / steps:>7.1f}  {name:<28} {site}")
    return out


def sync_sites(fn) -> dict:
    """{'path:line function <- caller': count} of the host syncs one call of `fn` makes (CUDA
    only): torch.cuda.set_sync_debug_mode('warn') turns each into a warning, which is caught
    with the Python stack at that moment (the two innermost frames of own code, so a shared
    helper shows who called it). Syncs stop the host from queueing work ahead of the GPU; at
    CP > 1 the host waits there for the GPU, then the GPU waits for the host."""
    import traceback
    import warnings

    sites: dict = {}

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing CUDA operation" not in str(message):
            return
        own = [fr for fr in reversed(traceback.extract_stack()[:-1])
               if any(p in fr.filename for p in OWN_CODE)]
        names = [_site([{"filename": fr.filename, "line": fr.lineno, "name": fr.name}])
                 for fr in own[:2]]
        key = " <- ".join(names) or f"{filename}:{lineno} (no model frame)"
        sites[key] = sites.get(key, 0) + 1

    old = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        saved, warnings.showwarning = warnings.showwarning, record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(old)
            warnings.showwarning = saved
    return dict(sorted(sites.items(), key=lambda kv: -kv[1]))


def peak_breakdown(events, top: int = 30) -> dict:
    """Replay a CUDA caching-allocator trace (torch.cuda.memory._snapshot()["device_traces"][i],
    recorded with torch.cuda.memory._record_memory_history) and describe the moment the
    allocated bytes peaked: the peak, how many tensors were live, and the live bytes grouped by
    allocation site (_site), largest first. 'alloc' adds a block, 'free_requested' removes it
    (the allocated-bytes counter drops there, as torch.cuda.memory_allocated does). Blocks
    allocated before recording started are unknown: `unmatched_frees` counts frees of them,
    and the peak is then a lower bound."""
    cur = peak = 0
    peak_at, unmatched, live = -1, 0, {}
    for i, e in enumerate(events):
        act = e.get("action")
        if act == "alloc":
            live[e["addr"]] = e["size"]
            cur += e["size"]
            if cur > peak:
                peak, peak_at = cur, i
        elif act == "free_requested":
            if live.pop(e["addr"], None) is None:
                unmatched += 1
            else:
                cur -= e["size"]
    at_peak = {}
    for e in events[:peak_at + 1]:
        act = e.get("action")
        if act == "alloc":
            at_peak[e["addr"]] = e
        elif act == "free_requested":
            at_peak.pop(e["addr"], None)
    sites: dict[str, list] = {}
    for e in at_peak.values():
        s = sites.setdefault(_site(e.get("frames")), [0, 0])
        s[0] += e["size"]
        s[1] += 1
    ranked = sorted(sites.items(), key=lambda kv: -kv[1][0])
    return {"peak_bytes": peak, "event_index": peak_at, "events": len(events),
            "live_tensors": len(at_peak), "unmatched_frees": unmatched,
            "sites": [{"site": k, "bytes": b, "tensors": n} for k, (b, n) in ranked[:top]],
            "other_bytes": sum(b for _, (b, _) in ranked[top:])}
