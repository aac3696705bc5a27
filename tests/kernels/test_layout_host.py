"""build_layout takes its sizes from the shapes or from one host copy of cu_seqlens
(host_cu_seqlens), with the same layout as the device formula it replaced."""
import torch

from mdn_kernels.mdn import layout as L
from mdn_kernels.mdn.api import check_cu_seqlens


def reference_layout(batch, seqlen, cu_seqlens, chunk_size):
    """The former build_layout (sizes read back with .item())."""
    if cu_seqlens is None:
        cu = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int64)
    else:
        cu = cu_seqlens.to(dtype=torch.int64)
    lens = cu[1:] - cu[:-1]
    nch = (lens + chunk_size - 1) // chunk_size
    offsets = torch.zeros(len(lens) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(nch, 0)
    total = int(cu[-1].item())
    seq_id = torch.repeat_interleave(torch.arange(len(lens)), lens, output_size=total)
    pos = torch.arange(total) - cu[:-1][seq_id]
    dest = (offsets[:-1][seq_id] + pos // chunk_size) * chunk_size + pos % chunk_size
    return dict(num_seqs=len(lens), num_chunks=int(offsets[-1].item()), total_tokens=total,
                dest=dest, seq_chunk_offsets=offsets, max_chunks=int(nch.max().item()))


def test_build_layout_matches_reference():
    cases = [(3, 100, None, 16), (1, 4096, None, 64), (2, 5, None, 64),
             (1, 203, torch.tensor([0, 1, 64, 65, 203], dtype=torch.int32), 64),
             (1, 200, torch.tensor([0, 50, 150, 200]), 16),
             (1, 16384, torch.arange(5, dtype=torch.int32) * 4096, 64)]
    for B, T, cu, C in cases:
        got = L.build_layout(B, T, cu, C, torch.device("cpu"))
        ref = reference_layout(B, T, cu, C)
        assert got.chunk_size == C
        for k, v in ref.items():
            g = getattr(got, k)
            if isinstance(v, torch.Tensor):
                assert torch.equal(g, v), (B, T, k)
            else:
                assert g == v, (B, T, k)


def test_host_copy_cached_and_invalidated(monkeypatch):
    """The cache path is CUDA-only: on CPU, `cu` poses as a CUDA tensor (is_cuda) and the
    device-to-host copies are counted through Tensor.to."""
    calls = []
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: self is cu or self.device.type == "cuda"))
    real_to = torch.Tensor.to

    def counting_to(self, *a, **k):
        if self is cu or (self.dtype == torch.int32 and self.data_ptr() == cu.data_ptr()):
            calls.append(1)
        return real_to(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    L._HOST_CU.clear()
    h1 = L.host_cu_seqlens(cu)
    h2 = L.host_cu_seqlens(cu)
    assert h1 is h2 and h1.tolist() == [0, 3, 7] and h1.dtype == torch.int64 and len(calls) == 1
    cu[2] = 9  # an in-place change bumps the version: a fresh copy
    h3 = L.host_cu_seqlens(cu)
    assert h3.tolist() == [0, 3, 9] and len(calls) == 2
    other = torch.tensor([0, 3, 7], dtype=torch.int32)  # another tensor: not the cached copy
    assert L.host_cu_seqlens(other).tolist() == [0, 3, 7]
    L._HOST_CU.clear()


def test_check_cu_seqlens_still_refuses():
    import pytest
    with pytest.raises(ValueError, match="strictly increasing"):
        check_cu_seqlens(torch.tensor([0, 5, 5, 9]), 1, 9, "offsets", "must end at 9")
    with pytest.raises(ValueError, match="must end at 9"):
        check_cu_seqlens(torch.tensor([0, 5, 8]), 1, 9, "offsets", "must end at 9")
    assert check_cu_seqlens(torch.tensor([0, 5, 9], dtype=torch.int32), 1, 9, "o", "e") == 2


def test_layout_built_once_per_cu_tensor():
    """One layout per cu_seqlens tensor (every layer passes the same one): reused while the tensor
    lives unmodified, rebuilt after an in-place change, dropped when the tensor is freed."""
    import gc

    cu = torch.tensor([0, 5, 40], dtype=torch.int32)
    a = L.build_layout(1, 40, cu, 16, torch.device("cpu"))
    assert L.build_layout(1, 40, cu, 16, torch.device("cpu")) is a
    assert L.build_layout(1, 40, cu.clone(), 16, torch.device("cpu")) is not a  # another tensor
    cu[1] = 9  # in place: the version counter moves
    b = L.build_layout(1, 40, cu, 16, torch.device("cpu"))
    assert b is not a and b.num_chunks == 3 and a.num_chunks == 4
    ref = reference_layout(1, 40, cu, 16)
    assert torch.equal(b.dest, ref["dest"]) and torch.equal(b.seq_chunk_offsets, ref["seq_chunk_offsets"])
    n = len(L._LAYOUTS)
    del cu
    gc.collect()
    assert len(L._LAYOUTS) < n  # its entries went with it
    assert L.build_layout(2, 8, None, 4, torch.device("cpu")) is L.build_layout(2, 8, None, 4, torch.device("cpu"))


def test_chunk_bounds_made_once_per_dest():
    """chunk_bounds (each chunk's first token and length) is made once per dest tensor, as the
    layout that owns it: equal to a fresh computation, reused while dest lives unmodified,
    rebuilt after an in-place change, dropped when dest is freed."""
    import gc

    from mdn_kernels.mdn import chunk_local_fused as F

    def fresh(dest, nc, c):
        first = torch.arange(nc, dtype=dest.dtype) * c
        s, e = torch.searchsorted(dest, first), torch.searchsorted(dest, first + c)
        return s.to(torch.int32), (e - s).to(torch.int32)

    lay = L.build_layout(1, 61, torch.tensor([0, 5, 26, 27, 61]), 16, torch.device("cpu"))
    dest = lay.dest.clone()
    got = F.chunk_bounds(dest, lay.num_chunks, 16)
    want = fresh(dest, lay.num_chunks, 16)
    assert all(torch.equal(g, w) and g.dtype == torch.int32 for g, w in zip(got, want))
    again = F.chunk_bounds(dest, lay.num_chunks, 16)
    assert again[0] is got[0] and again[1] is got[1]
    assert F.chunk_bounds(dest.clone(), lay.num_chunks, 16)[0] is not got[0]  # another tensor
    dest[-1] += 3  # in place: the version counter moves, the bounds are made again
    moved = F.chunk_bounds(dest, lay.num_chunks, 16)
    assert moved[0] is not got[0]
    assert all(torch.equal(g, w) for g, w in zip(moved, fresh(dest, lay.num_chunks, 16)))
    n = len(F._BOUNDS)
    del dest
    gc.collect()
    assert len(F._BOUNDS) < n  # its entries went with it


def test_cp_local_view_made_once_per_cu_tensor(monkeypatch):
    """mdn_kernels.cp.api._local_view: the CP op's local view of GLOBAL offsets, its device copy
    of the local offsets and hence the op's layout are made once per cu_seqlens tensor (each was
    a host sync per layer on the GPU before session 9); a changed or new tensor is rebuilt."""
    from mdn_kernels.cp import api
    from mdn_kernels.cp.layout import packed_view

    made = []
    real = api.packed_view
    monkeypatch.setattr(api, "packed_view", lambda *a: made.append(1) or real(*a))
    api._VIEWS.clear()
    cu = torch.tensor([0, 5, 12, 16], dtype=torch.int32)
    dev = torch.device("cpu")
    v1, c1 = api._local_view(cu, 8, 1, 2, dev)
    v2, c2 = api._local_view(cu, 8, 1, 2, dev)
    assert v1 is v2 and c1 is c2 and len(made) == 1
    ref = packed_view(cu, 8, 1, 2)
    assert (v1.in_seq, v1.out_seq, v1.init_rows) == (ref.in_seq, ref.out_seq, ref.init_rows)
    assert c1.tolist() == ref.cu_local.tolist() == [0, 4, 8]
    assert L.build_layout(1, 8, c1, 4, dev) is L.build_layout(1, 8, c2, 4, dev)
    api._local_view(cu, 8, 0, 2, dev)                 # another rank: its own entry
    assert len(made) == 2
    cu[1] = 6                                          # changed in place: rebuilt
    v3, c3 = api._local_view(cu, 8, 1, 2, dev)
    assert len(made) == 3 and c3 is not c1
    api._VIEWS.clear()


def test_device_copy_of_host_on_the_cpu_is_the_host_tensor():
    """device_copy_of_host's CPU path (its CUDA path, pinned and non-blocking with the host copy
    recorded, is tests/gpu/test_cp_gpu.py::test_offsets_reach_the_gpu_without_a_host_sync):
    on the CPU the offsets are used as they are, and host_cu_seqlens reads them directly."""
    from mdn_kernels.mdn.layout import device_copy_of_host, host_cu_seqlens

    host = torch.tensor([0, 5, 130, 4096], dtype=torch.int64)
    dev = device_copy_of_host(host, "cpu")
    assert dev is host
    assert torch.equal(host_cu_seqlens(dev), host)
