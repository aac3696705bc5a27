"""Layout-independent weight init: every part of the model draws its weights from the CPU RNG
seeded by (the run's seed, the part's name), not from one stream shared by whatever this rank
happens to build (see specs.SeededTransformerLayer and MDNGPTModel)."""
from __future__ import annotations

import hashlib
from contextlib import contextmanager

import torch


def part_seed(base: int, *key) -> int:
    """A 63-bit seed from the run's seed and a key (stable across processes and Python runs)."""
    digest = hashlib.sha256(repr((int(base),) + tuple(key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@contextmanager
def keyed_cpu_rng(*key):
    """Inside: the global CPU RNG seeded by part_seed(torch.initial_seed(), *key); on exit the
    RNG (its seed included) is as before, so the parts built outside see an unchanged stream."""
    seed = part_seed(torch.initial_seed(), *key)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def reinit_vocab_parallel(weight: torch.Tensor, vocab: int, key: str, init_method, params_dtype) -> None:
    """Redraw a vocab-parallel weight ([vocab / TP, d], rows split over TP) as Megatron's CPU init
    does — the full [vocab, d] tensor, then this TP rank's rows — from keyed_cpu_rng(key)."""
    from megatron.core.tensor_parallel.layers import _initialize_affine_weight_cpu

    with keyed_cpu_rng(key):
        _initialize_affine_weight_cpu(weight, vocab, weight.shape[1], weight.shape[0], 0, init_method,
                                      params_dtype=params_dtype, skip_set_tensor_parallel_attributes=True)
