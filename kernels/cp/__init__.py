"""Context parallelism for the MDN op: the state pair crosses rank boundaries exactly.

`mdn_kernels.mdn_chunk(..., cp_group=group, cp_mode="allgather"|"ring")` dispatches here
(api.mdn_chunk_cp, which documents the contract); `conv_halo`, `padded_doc_offsets`,
`previous_rank_tail`, `tail_grad_from_next`, `halo_state_offsets` and `local_cu_seqlens` are the
helpers the model's mixer needs for its short conv under CP.
"""
from .api import CP_MODES, check_cp_group, mdn_chunk_cp
from .halo import (conv_halo, halo_state_offsets, padded_doc_offsets, previous_rank_tail,
                   tail_grad_from_next)
from .layout import CPLocalView, batched_view, local_cu_seqlens, packed_view
from .transition import default_group_chunks, rank_map, tree_compose

__all__ = ["CP_MODES", "mdn_chunk_cp", "check_cp_group", "conv_halo", "padded_doc_offsets",
           "previous_rank_tail", "tail_grad_from_next", "halo_state_offsets", "local_cu_seqlens",
           "CPLocalView", "batched_view", "packed_view", "rank_map", "tree_compose",
           "default_group_chunks"]
