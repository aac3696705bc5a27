"""mdn_kernels: Momentum DeltaNet ops (PyTorch references, Triton kernels, CP state exchange)."""
from .mdn import (
    fused_recurrent_mdn,
    gated_delta_rule_reference,
    mdn_chunk,
    mdn_recurrent_reference,
)

__all__ = ["mdn_chunk", "fused_recurrent_mdn", "mdn_recurrent_reference", "gated_delta_rule_reference"]
