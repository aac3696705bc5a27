"""Run logging on rank 0: metrics.jsonl, TensorBoard scalars, a console progress line.

metrics.jsonl has one JSON object per logged step (DESIGN.md §8): step, loss, lr, grad_norm,
tokens (consumed so far), tokens_per_s, and more (mfu, memory_gb, host_rss_gb, skipped_steps, ...).
Validation results are separate lines with ``val_loss``.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time


def model_flops_per_token(model_cfg, seq_len: int) -> float:
    """Training FLOPs per token (3× forward, the recurrence included): the model package's
    count (mdn_scale/model/stats.py documents the formula)."""
    from mdn_scale.model import stats

    return float(stats.model_stats(model_cfg, seq_len, 1)["flops_per_token_train"])


def peak_flops(device) -> float | None:
    """Dense bf16 peak of the accelerator, for MFU; None on CPU (MFU not reported)."""
    if device.type != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(device)
    for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12)):
        if key in name:
            return flops
    return None


def memory_stats(device) -> dict:
    """Peak memory of this process so far: ``memory_gb`` is the torch allocator's peak on a GPU
    (``host_rss_gb`` beside it: the peak resident host memory, where CPU offload lives), the
    peak resident memory on CPU."""
    import resource

    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    if device.type != "cuda":
        return {"memory_gb": rss_gb}
    import torch

    return {"memory_gb": torch.cuda.max_memory_allocated(device) / 2**30, "host_rss_gb": rss_gb}


class MetricsLogger:
    def __init__(self, directory: str, *, enabled: bool, tensorboard: bool, total_steps: int,
                 resume_step: int = 0):
        self.enabled = enabled
        self.total_steps = total_steps
        self.start_time = time.time()
        self.start_step = resume_step
        self.writer = None
        self.jsonl = None
        if not enabled:
            return
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "metrics.jsonl")
        if resume_step > 0 and os.path.exists(path):
            _truncate_after(path, resume_step)  # drop lines a killed run logged past its checkpoint
        self.jsonl = open(path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run hides the events the killed run wrote after its checkpoint
            self.writer = SummaryWriter(directory, purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **record}
        # strict JSON: a non-finite value (a skipped step's loss) is written as null
        plain = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        self.jsonl.write(json.dumps(plain, allow_nan=False) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                    self.writer.add_scalar(f"train/{k}" if not k.startswith("val_") else f"val/{k[4:]}",
                                           v, step)
        if "loss" in record:
            self._console(step, record)
        elif "val_loss" in record:
            print(f"step {step:>6} | validation loss {record['val_loss']:.4f} "
                  f"(ppl {math.exp(min(record['val_loss'], 50)):.2f})", flush=True)

    def _console(self, step: int, r: dict) -> None:
        done = step - self.start_step
        elapsed = time.time() - self.start_time
        eta = elapsed / max(done, 1) * (self.total_steps - step)
        parts = [f"step {step:>6}/{self.total_steps}", f"loss {r['loss']:.4f}",
                 f"lr {r['lr']:.2e}", f"gnorm {r['grad_norm']:.3f}",
                 f"{r['tokens_per_s']:,.0f} tok/s"]
        if r.get("mfu") is not None:
            parts.append(f"MFU {100 * r['mfu']:.1f}%")
        if r.get("skipped_steps"):
            parts.append(f"skipped {r['skipped_steps']}")
        parts.append(f"ETA {_hms(eta)}")
        print(" | ".join(parts), file=sys.stdout, flush=True)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


def _truncate_after(path: str, step: int) -> None:
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except ValueError:
                pass  # a line cut short by a kill
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)
