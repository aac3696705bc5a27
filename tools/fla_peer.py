"""FLA as a benchmark peer: FLA 0.6.0 refuses its gated chunk backward on Hopper with Triton
3.4–3.7.0 (FLA issue #640, a miscompile). The lent H100s run Triton 3.6.0, so the benchmarks lift
that guard FOR TIMING ONLY: FLA's gradients in such a run are not trusted and not used.
Shared by tools/bench_kernels.py, tools/bench_model.py (--mixer megatron_gdn) and
tools/bench_cp.py (--fla-peer)."""
from __future__ import annotations


def lift_fla_guard() -> dict:
    """Lift the guard; returns what was done, for the result JSON."""
    import fla

    info = {"fla": getattr(fla, "__version__", "?"), "fla_guard_lifted": False}
    try:
        import fla.ops.common.chunk_o as chunk_o

        if hasattr(chunk_o, "TRITON_ABOVE_3_7_1"):
            info["fla_guard_was"] = bool(chunk_o.TRITON_ABOVE_3_7_1)
            chunk_o.TRITON_ABOVE_3_7_1 = True
            info["fla_guard_lifted"] = True
            info["note"] = ("FLA's Hopper guard (Triton < 3.7.1, FLA #640) lifted for timing only: "
                            "FLA's gradients in this run are not trusted")
    except ImportError as e:
        info["fla_guard_error"] = repr(e)
    return info
