"""The CP op's maps kept from a layer's forward for its recompute (train.recompute_keep_cp_maps).

Under activation recompute a layer's forward runs twice: once in the forward pass (its saved
tensors dropped) and again in the backward (torch.utils.checkpoint rebuilds them). For the CP op
(all-gather mode) the second run repeats the expensive part of its forward, the group maps
[𝒯_g | ℬ_g] (a 2K + V wide recurrence over every local chunk: at K = 256, V = 512 twice the
state pass's work), their tree, the all-gather and the fold, only to get the same pairs again.
On four H200s that is ~50 ms of the 1.3B CP step's ~200 ms over CP = 1 (BENCHMARKS.md, session
18). A KeptMaps object spans one checkpointed layer call: its first run records what each CP op
call's `_entering_pairs` returned (the pair entering every group, the tree nodes' 𝒯, the later
ranks' 𝒯), and the recompute takes them back in the same order instead of computing them.

Price: those tensors stay alive from the layer's forward to its backward, per layer about
(2·groups − 1)·H·2K·2K + groups·H·2K·V fp32 numbers (~80 MB per 1.3B layer at 16K tokens per
rank, ~1.2 GB at 256K): a selective-recompute trade, opt-in. Exact: the recompute's inputs are
the forward's (deterministic kernels), so the kept pairs are the ones it would compute; each
take checks the call's shapes against the recorded ones and raises on a mismatch. Every rank
of a CP group records and replays the same calls, so all of them skip the all-gather together.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

_LOCAL = threading.local()


class KeptMaps:
    """One checkpointed layer call. `scope()` wraps each run of the layer's forward: the first
    run records (keep), a later one replays (take) and then lets the tensors go."""

    def __init__(self):
        self.items: list = []
        self.replay_at: int | None = None

    @contextmanager
    def scope(self):
        prev = getattr(_LOCAL, "kept", None)
        self.replay_at = 0 if self.items else None
        _LOCAL.kept = self
        try:
            yield self
        finally:
            _LOCAL.kept = prev
            if self.replay_at is not None:   # the recompute is done: free the kept maps
                self.items, self.replay_at = [], None

    def take(self, signature: tuple):
        """The recorded value of this call (replaying), or None (recording, or outside a scope)."""
        if self.replay_at is None:
            return None
        if self.replay_at >= len(self.items):
            raise RuntimeError(f"train.recompute_keep_cp_maps: the recompute made more CP op calls "
                               f"({self.replay_at + 1}) than the layer's forward ({len(self.items)})")
        sig, value = self.items[self.replay_at]
        if sig != signature:
            raise RuntimeError(f"train.recompute_keep_cp_maps: CP op call {self.replay_at} of the "
                               f"recompute has {signature}, the forward's had {sig}")
        self.replay_at += 1
        return value

    def keep(self, signature: tuple, value) -> None:
        if self.replay_at is None:
            self.items.append((signature, value))


def current() -> KeptMaps | None:
    """The KeptMaps of the layer call running on this thread, if any."""
    return getattr(_LOCAL, "kept", None)
