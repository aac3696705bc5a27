"""Momentum DeltaNet ops: reference (naive), chunkwise torch spec, Triton kernels."""
from .api import mdn_chunk
from .fused_recurrent import fused_recurrent_mdn
from .naive import gated_delta_rule_reference, l2norm, mdn_recurrent_reference

__all__ = ["mdn_chunk", "fused_recurrent_mdn", "mdn_recurrent_reference", "gated_delta_rule_reference", "l2norm"]
