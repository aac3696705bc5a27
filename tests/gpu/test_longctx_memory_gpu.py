"""The memory estimate (mdn_scale/train/memory.py) against measured peaks on the GPU: within 15%
of torch.cuda.max_memory_allocated for the real trainer (bf16, AdamW, recompute on/off, CP, TP,
Megatron's loss and the chunked loss). Written on a machine without a GPU: not yet run at the
time of writing.

    MDN_RESULTS_DIR=$OUT python -m pytest -q tests/gpu/test_longctx_memory_gpu.py [-k 1gpu]

Case ids say the GPUs they need (1gpu / 2gpu), so benchmarks/suite.py runs them side
by side on disjoint GPUs (CUDA_VISIBLE_DEVICES + -k). Each case writes its result to
$MDN_RESULTS_DIR/longctx_<id>.json as soon as it ends; MDN_LONGCTX_TIMEOUT (seconds, default 540)
bounds one case, and a case past it is stopped with all its processes.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: run tests/gpu on the lent device")]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOLERANCE = 0.15  # the target: estimate within 15% of the measured peak

CASES = [  # (model config, seq_len, tp, cp, recompute, GPUs needed, ZeRO-1, loss_chunk_tokens)
    ("configs/mdn_400m.yaml", 8192, 1, 1, False, 1, False, 0),        # no recompute, Megatron's loss
    ("configs/mdn_1.3b.yaml", 16384, 1, 1, True, 1, False, 0),        # recompute, Megatron's loss
    ("configs/mdn_1.3b.yaml", 65536, 1, 1, True, 1, False, 4096),     # the op's backward dominates
    ("configs/mdn_400m.yaml", 65536, 1, 1, True, 1, False, 4096),
    ("configs/mdn_1.3b.yaml", 131072, 1, 2, True, 2, True, 4096),     # CP = 2, ZeRO-1
    ("configs/mdn_1.3b.yaml", 65536, 2, 1, True, 2, False, 4096),     # TP = 2 (vocab-parallel loss)
]


def run_group(cmd, timeout):
    """Run cmd in its own session; on timeout, or when this process is told to stop (SIGTERM
    from an outer `timeout`), kill its whole process group (torchrun and its workers: one left
    behind keeps its GPU's memory). Returns (process, output, timed_out)."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                         start_new_session=True)

    def stop(signum, frame):
        os.killpg(p.pid, signal.SIGKILL)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        out, _ = p.communicate(timeout=timeout)
        return p, out, False
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        return p, out or "", True
    finally:
        signal.signal(signal.SIGTERM, previous)


def case_id(c):
    model, seq, tp, cp, rc, gpus, zero, chunk = c
    return (f"{gpus}gpu-{os.path.basename(model)[:-5]}-{seq}-tp{tp}-cp{cp}-rc{int(rc)}-z{int(zero)}"
            f"-loss{chunk}")


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_estimate_within_15_percent(case, record):
    model, seq_len, tp, cp, recompute, gpus, zero, chunk = case
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} CUDA GPUs")
    out_dir = os.environ.get("MDN_RESULTS_DIR")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
           os.path.join(ROOT, "benchmarks", "longctx_memory.py"), "--model", os.path.join(ROOT, model),
           "--seq-len", str(seq_len), "--tp", str(tp), "--cp", str(cp), "--steps", "2",
           "--loss-chunk-tokens", str(chunk)]
    if recompute:
        cmd.append("--recompute")
    if zero:
        cmd.append("--distributed-optimizer")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        cmd += ["--json", os.path.join(out_dir, f"longctx_{case_id(case)}.json")]
    p, out, timed_out = run_group(cmd, int(os.environ.get("MDN_LONGCTX_TIMEOUT", "540")))
    if timed_out:
        pytest.fail(f"timed out: {' '.join(cmd)}\n{out[-3000:]}")
    lines = [ln for ln in out.splitlines() if ln.startswith("LONGCTX_MEMORY ")]
    assert p.returncode == 0 and lines, out[-3000:]
    res = json.loads(lines[-1][len("LONGCTX_MEMORY "):])
    record(f"longctx_memory/{case_id(case)}", res)
    print(f"{case_id(case)}: estimate {res['estimate_allocated_gib']:.2f} GiB "
          f"({res['estimate_peak_at']}), measured {res.get('measured_peak_gib', float('nan')):.2f} GiB", flush=True)
    assert not res["oom"], res
    assert abs(res["error"]) <= TOLERANCE, (
        f"estimate {res['estimate_allocated_gib']:.2f} GiB vs measured {res['measured_peak_gib']:.2f} GiB "
        f"({100 * res['error']:+.1f}%)")
