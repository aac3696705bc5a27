"""train.recompute_keep_cp_maps (mdn_kernels.cp.kept): under activation recompute the CP op's
recomputed forward takes the group maps, the entering pairs and the later ranks' maps from the
layer's forward instead of computing them (and skips the all-gather) — with every output and
gradient bit for bit those of plain recompute, in float64 on two and three gloo processes.
Also: the recompute frees the kept maps, and a call whose shapes differ is refused."""
from __future__ import annotations

import os
import socket
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.checkpoint import checkpoint

from mdn_kernels.cp import api as cp_api, mdn_chunk_cp, state_pass_cp
from mdn_kernels.cp.kept import KeptMaps
from mdn_kernels.mdn.testing import random_inputs

H, K, V, C = 2, 8, 16, 16
T = 48                      # tokens per rank: 3 chunks
DOCS = {2: [0, 20, 70, 96], 3: [0, 20, 70, 100, 144]}   # documents cross the rank boundaries


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def layer_inputs(R, seed=7):
    """q, k, v and gates for the whole sequence (float64) and a weight standing in for the layer's
    input projection, so the checkpointed "layer" has a parameter before the op."""
    xs = random_inputs(1, R * T, H, K, V, seed=seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(V, V, generator=g, dtype=torch.float64) / V ** 0.5
    cot = torch.randn(1, R * T, H, V, generator=g, dtype=torch.float64)
    return xs, w, cot


def run_layer(rank, R, group, keep: bool):
    xs, w, cot = layer_inputs(R)
    sl = slice(rank * T, (rank + 1) * T)
    local = [x[:, sl].clone().requires_grad_() for x in xs]
    w = w.clone().requires_grad_()
    cu = torch.tensor(DOCS[R], dtype=torch.int32)

    def layer(q, k, v, la, lm, b, e, w):
        o, _ = mdn_chunk_cp(q, k, v @ w, la, lm, b, e, scale=None, initial_state=None,
                            output_final_state=False, cu_seqlens=cu, use_qk_l2norm=True,
                            p_times_alpha=True, cp_group=group, backend="torch", chunk_size=C,
                            group_chunks=1)   # every chunk its own group: the tree is used
        return o

    kept = KeptMaps()

    def run(*a):
        if not keep:
            return layer(*a)
        with kept.scope():
            return layer(*a)

    calls = {"group_maps": 0, "all_gather": 0}
    real_store, real_gather = state_pass_cp.tree_store, state_pass_cp._all_gather

    def counting_store(*a, **k):
        calls["group_maps"] += 1
        return real_store(*a, **k)

    def counting_gather(*a, **k):
        calls["all_gather"] += 1
        return real_gather(*a, **k)

    state_pass_cp.tree_store, state_pass_cp._all_gather = counting_store, counting_gather
    try:
        o = checkpoint(run, *local, w, use_reentrant=False)
        after_forward = dict(calls)
        kept_items = len(kept.items)
        grads = torch.autograd.grad((o * cot[:, sl]).sum(), local + [w])
    finally:
        state_pass_cp.tree_store, state_pass_cp._all_gather = real_store, real_gather
    return {"o": o.detach(), "grads": [g.detach() for g in grads], "calls": calls,
            "after_forward": after_forward, "kept_items": kept_items,
            "kept_after_backward": len(kept.items)}


def mismatch_error(rank, R, group):
    """A recorded call replayed with other shapes is refused by name."""
    kept = KeptMaps()
    with kept.scope():
        kept.keep(("a",), 1)
    try:
        with kept.scope():
            kept.take(("b",))
    except RuntimeError as err:
        return str(err)
    return None


def worker(rank, R, port, outdir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=R)
    torch.set_num_threads(1)
    group = dist.new_group(list(range(R)))
    cp_api._AGREED.clear()
    res = {"plain": run_layer(rank, R, group, keep=False),
           "kept": run_layer(rank, R, group, keep=True),
           "mismatch": mismatch_error(rank, R, group)}
    torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=["R2", "R3"])
def ranks(request):
    R = request.param
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(worker, args=(R, free_port(), d), nprocs=R, join=True)
        return R, [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(R)]


def test_kept_maps_give_plain_recompute_bit_for_bit(ranks):
    R, results = ranks
    for rank, res in enumerate(results):
        plain, kept = res["plain"], res["kept"]
        assert torch.equal(plain["o"], kept["o"]), rank
        for i, (a, b) in enumerate(zip(plain["grads"], kept["grads"])):
            assert torch.equal(a, b), (rank, i, (a - b).abs().max())
        assert plain["grads"][-1].abs().sum() > 0   # the weight before the op gets a gradient


def test_recompute_skips_the_maps_and_the_all_gather(ranks):
    """Plain recompute builds the group maps twice on every rank but the last (which needs none
    but for its own groups' tree: it builds them too, as every chunk is a group here) and
    all-gathers twice in the forward; kept, once each. The backward's own all-gather stays."""
    R, results = ranks
    for rank, res in enumerate(results):
        plain, kept = res["plain"], res["kept"]
        assert plain["after_forward"] == kept["after_forward"] == {"group_maps": 1, "all_gather": 1}, rank
        assert plain["calls"] == {"group_maps": 2, "all_gather": 3}, (rank, plain["calls"])
        assert kept["calls"] == {"group_maps": 1, "all_gather": 2}, (rank, kept["calls"])
        assert kept["kept_items"] == 1 and kept["kept_after_backward"] == 0, rank


def test_a_replay_with_other_shapes_is_refused(ranks):
    _, results = ranks
    for res in results:
        assert "CP op call 0 of the recompute has ('b',), the forward's had ('a',)" in res["mismatch"]
