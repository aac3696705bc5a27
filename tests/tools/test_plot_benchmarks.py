"""tools/plot_benchmarks.py draws its PNGs from the recorded results."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_plots_written(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "plot_benchmarks.py"),
                          "--out-dir", str(tmp_path)], capture_output=True, text=True, check=True)
    for name in ("kernels_vs_gdn.png", "cp_weak_scaling.png", "memory_estimate_vs_measured.png",
                 "deepspeed_vs_megatron_1p3b.png", "model_throughput.png", "cp_model_grad_norms.png",
                 "cp_scaling_v8.png", "cp_model_weak_scaling.png", "session13_in_proj_alignment.png",
                 "session18_four_gpus.png", "session19_two_gpus.png",
                 "session20_state_pairs.png", "session21_bwd_segments.png",
                 "session22_state_factors.png"):
        png = tmp_path / name
        assert f"wrote {name}" in out.stdout
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
