"""Loaders: the batch contract, packing and cu_seqlens, DP split, order, resume, mixing,
validation split, bad shards, pipe: URLs, cp_slice."""

import logging
import os
import shutil

import numpy as np
import pytest
import torch
from data_helpers import corpus, decode_bytes, split_docs, stream_of, write_jsonl

from mdn_scale.data import BYTE_EOD_ID, DataConfig, ShardError, build_train_loader, build_valid_loader, cp_slice, make_shards
from mdn_scale.data.format import read_manifest, read_shard


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """80 documents in about 10 shards (byte tokenizer)."""
    d = tmp_path_factory.mktemp("data")
    texts = corpus(80, seed=11)
    make_shards([write_jsonl(d / "in.jsonl", texts)], str(d / "a"), shard_size_mb=0.004, progress=False)
    return str(d / "a"), texts


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """Two datasets whose documents are all 'a's or all 'b's."""
    d = tmp_path_factory.mktemp("mix")
    for name, ch in (("A", "a"), ("B", "b")):
        texts = [ch * (5 + 7 * i % 40) for i in range(40)]
        make_shards([write_jsonl(d / f"{name}.jsonl", texts)], str(d / name), shard_size_mb=0.0005, progress=False)
    return str(d / "A"), str(d / "B")


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(xs, ys):
    return len(xs) == len(ys) and all(set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(xs, ys))


def all_docs(path):
    m = read_manifest(os.path.join(path, "manifest.json"))
    return [d for s in m["shards"] for _, d in read_shard(os.path.join(path, s["name"]))]


def test_batch_contract_packing_and_cu_seqlens(shards):
    path, texts = shards
    T, B = 50, 3
    for reset in (True, False):
        cfg = DataConfig(datasets=[path], seq_len=T, micro_batch=B, shuffle=False, shard_interleave=1,
                         reset_at_doc_boundary=reset, prefetch=0)
        batches = take(build_train_loader(cfg), 20)
        b = batches[0]
        assert set(b) == {"tokens", "labels", "loss_mask", "cu_seqlens"}
        assert b["tokens"].shape == b["labels"].shape == b["loss_mask"].shape == (B, T)
        assert (b["tokens"].dtype, b["labels"].dtype, b["loss_mask"].dtype, b["cu_seqlens"].dtype) == (
            torch.int64, torch.int64, torch.float32, torch.int32)
        assert all(torch.equal(x["tokens"][:, 1:], x["labels"][:, :-1]) for x in batches)
        assert all(bool((x["loss_mask"] == 1).all()) for x in batches)
        # unshuffled, one shard at a time: the stream is the documents in manifest order
        docs = all_docs(path)
        expect = np.concatenate(docs)
        stream = stream_of(batches)
        assert np.array_equal(stream, expect[:len(stream)])
        # cu_seqlens: row starts, plus document starts inside rows when reset is on
        doc_starts = set(np.cumsum([0] + [len(d) for d in docs]).tolist())
        for k, x in enumerate(batches):
            bounds = {B * T}
            for r in range(B):
                off = (k * B + r) * T  # stream offset of the row's first input
                bounds.add(r * T)
                if reset:
                    bounds |= {r * T + p for p in range(1, T) if off + p in doc_starts}
            assert x["cu_seqlens"].tolist() == sorted(bounds)
        if reset:
            assert sum(len(x["cu_seqlens"]) - B - 1 for x in batches) > 5  # some documents start inside rows


def test_dp_split_disjoint_complete_and_layout_free(shards):
    path, _ = shards
    base = dict(datasets=[path], seq_len=32, seed=3, shard_interleave=2, prefetch=0)
    single = take(build_train_loader(DataConfig(**base, micro_batch=1), 0, 1), 24)
    seqs = [b["tokens"][0] for b in single]
    dp, B = 3, 2
    for r in range(dp):
        rows = [row for b in take(build_train_loader(DataConfig(**base, micro_batch=B), r, dp), 4) for row in b["tokens"]]
        # rank r holds global sequences r, r+dp, r+2dp, ...: disjoint, and together all of them
        assert all(torch.equal(row, seqs[i * dp + r]) for i, row in enumerate(rows))


def test_order_deterministic_per_seed(shards):
    path, _ = shards
    cfg = lambda seed: DataConfig(datasets=[path], seq_len=40, micro_batch=2, seed=seed, prefetch=1)  # noqa: E731
    a, b, c = (take(build_train_loader(cfg(s)), 6) for s in (5, 5, 6))
    assert same(a, b)
    assert not same(a, c)


def test_exact_resume_across_epochs_mixture_and_layouts(shards, two_sets):
    path, _ = shards
    A, Bset = two_sets
    cfg = DataConfig(datasets=[{"path": path, "weight": 0.5}, A, {"path": Bset, "weight": 1.5}], seq_len=64,
                     micro_batch=2, seed=9, shard_interleave=3, prefetch=3)
    # A and B (about 1000 tokens each) go through 2-4 epochs in these 60 micro-batches
    full = take(build_train_loader(cfg, 0, 1), 60)
    for k in (0, 1, 17, 41):
        first = build_train_loader(cfg, 0, 1)
        assert same(take(first, k), full[:k])
        sd = first.state_dict()
        first.close()
        again = build_train_loader(cfg, 0, 1)
        again.load_state_dict(sd)
        assert same(take(again, 60 - k), full[k:])
        if k == 41:  # the small datasets are past their first epoch here
            assert min(p["source"]["epoch"] for p in sd["stream"]["packers"][1:]) >= 1
    # saved by a dp=2 run (micro_batch 1), loaded by dp=1 (micro_batch 2): the same global sequences
    r0, r1 = (build_train_loader(DataConfig(**{**cfg.to_dict(), "micro_batch": 1}), r, 2) for r in (0, 1))
    take(r0, 13), take(r1, 13)
    assert r0.state_dict() == r1.state_dict()  # identical on every rank
    one = build_train_loader(cfg, 0, 1)
    one.load_state_dict(r0.state_dict())
    assert same(take(one, 5), full[13:18])
    with pytest.raises(ValueError, match="seq_len"):
        build_train_loader(DataConfig(**{**cfg.to_dict(), "seq_len": 65})).load_state_dict(r0.state_dict())
    with pytest.raises(ValueError, match="datasets"):
        build_train_loader(DataConfig(**{**cfg.to_dict(), "datasets": [path, A, A]})).load_state_dict(r0.state_dict())


def test_resume_after_moving_the_data(shards, tmp_path):
    path, _ = shards
    cfg = dict(seq_len=32, micro_batch=2, prefetch=0)
    first = build_train_loader(DataConfig(datasets=[path], **cfg))
    take(first, 5)
    expect = take(first, 3)
    shutil.copytree(path, tmp_path / "moved")
    moved = build_train_loader(DataConfig(datasets=[str(tmp_path / "moved")], **cfg))
    # the state after 5 batches, taken from a fresh loader run to the same point
    again = build_train_loader(DataConfig(datasets=[path], **cfg))
    take(again, 5)
    moved.load_state_dict(again.state_dict())
    assert same(take(moved, 3), expect)


def test_mixing_weights(two_sets):
    A, Bset = two_sets
    cfg = DataConfig(datasets=[{"path": A, "weight": 3}, {"path": Bset, "weight": 1}], seq_len=16, micro_batch=8, prefetch=0)
    rows = torch.cat([b["tokens"] for b in take(build_train_loader(cfg), 100)])
    from_a = [(set(r.tolist()) - {BYTE_EOD_ID}) == {ord("a")} for r in rows]
    from_b = [(set(r.tolist()) - {BYTE_EOD_ID}) == {ord("b")} for r in rows]
    assert all(x != y for x, y in zip(from_a, from_b))  # each sequence comes from one dataset
    assert abs(np.mean(from_a) - 0.75) < 0.05  # 800 draws: sd 0.015


@pytest.mark.parametrize("holdout", ["documents", "shards"])
def test_validation_split_disjoint_from_train(shards, holdout):
    path, texts = shards
    cfg = DataConfig(datasets=[path], seq_len=64, micro_batch=1, validation_fraction=0.25, holdout=holdout,
                     shard_interleave=2, prefetch=0)
    valid = list(build_valid_loader(cfg))
    vstream = np.concatenate([valid[0]["tokens"][0][:1].numpy()] + [b["labels"][0][b["loss_mask"][0] > 0].numpy() for b in valid])
    vdocs = [decode_bytes(d) for d in [vstream[:np.argmax(vstream == BYTE_EOD_ID) + 1]] + split_docs(vstream)]
    total = sum(len(t.encode()) + 1 for t in texts)
    tstream = stream_of(take(build_train_loader(cfg), total // 64 + 1))
    tdocs = [decode_bytes(d) for d in [tstream[:np.argmax(tstream == BYTE_EOD_ID) + 1]] + split_docs(tstream)]
    first_epoch = tdocs[:len(texts) - len(vdocs)]
    assert 0 < len(vdocs) < len(texts) // 2
    assert set(vdocs).isdisjoint(first_epoch)
    assert sorted(vdocs + first_epoch) == sorted(texts)
    assert list(build_valid_loader(cfg)) and same(list(build_valid_loader(cfg)), valid)  # re-iterable


def test_validation_ranks_equal_length_and_padded(shards):
    path, _ = shards
    cfg = DataConfig(datasets=[path], seq_len=64, micro_batch=2, validation_fraction=0.3, prefetch=0)
    one = list(build_valid_loader(cfg, 0, 1))
    ranks = [list(build_valid_loader(cfg, r, 3)) for r in range(3)]
    assert len({len(x) for x in ranks}) == 1
    mask = lambda bs: sum(float(b["loss_mask"].sum()) for b in bs)  # noqa: E731
    assert mask(one) == sum(mask(x) for x in ranks)
    last = one[-1]
    n = int(last["loss_mask"].sum())
    assert 0 < n < 2 * 64 and (last["loss_mask"].flatten()[n:] == 0).all()
    assert (n // 64) * 64 + n % 64 in last["cu_seqlens"].tolist() or n % 64 == 0


def corrupt_copy(src, dst, how):
    shutil.copytree(src, dst)
    m = read_manifest(os.path.join(dst, "manifest.json"))
    victim = os.path.join(dst, m["shards"][2]["name"])
    data = open(victim, "rb").read()
    import tarfile

    with tarfile.open(victim) as t:
        members = t.getmembers()
    if how == "truncated":  # cut inside a member's data
        m3 = members[3]
        data = data[: m3.offset_data + m3.size // 2]
    elif how == "garbage":
        data = bytes(range(256)) * 40
    elif how == "members":  # cut at a member boundary: a readable but shorter tar
        data = data[: members[2].offset]
    open(victim, "wb").write(data)
    return victim


@pytest.mark.parametrize("how, why", [("truncated", "unexpected end of data"), ("garbage", "invalid header"),
                                      ("members", "holds 2 documents, the manifest says")])
def test_corrupt_shard_error_or_skip(shards, tmp_path, how, why, caplog):
    path, _ = shards
    victim = corrupt_copy(path, str(tmp_path / "c"), how)
    cfg = dict(datasets=[str(tmp_path / "c")], seq_len=64, micro_batch=4, shuffle=False, shard_interleave=1, prefetch=2)
    loader = build_train_loader(DataConfig(**cfg))
    with pytest.raises(ShardError, match=os.path.basename(victim)) as e:
        take(loader, 50)
    assert e.value.shard == victim and why in str(e.value)
    with caplog.at_level(logging.WARNING, logger="mdn_scale.data"):
        got = take(build_train_loader(DataConfig(**cfg, skip_bad_shards=True)), 50)
    assert any(os.path.basename(victim) in r.getMessage() and "skip" in r.getMessage() for r in caplog.records)
    # the other shards' documents, in order: the stream skips exactly the bad shard
    m = read_manifest(os.path.join(path, "manifest.json"))
    docs = [d for i, s in enumerate(m["shards"]) if i != 2 for _, d in read_shard(os.path.join(path, s["name"]))]
    stream = stream_of(got)
    assert np.array_equal(stream, np.concatenate(docs * 3)[:len(stream)])


def test_missing_shard(shards, tmp_path, caplog):
    path, _ = shards
    shutil.copytree(path, tmp_path / "m")
    name = read_manifest(os.path.join(path, "manifest.json"))["shards"][1]["name"]
    os.remove(tmp_path / "m" / name)
    with pytest.raises(ShardError, match=f"{name}: does not exist"):
        build_train_loader(DataConfig(datasets=[str(tmp_path / "m")], seq_len=16))
    with caplog.at_level(logging.WARNING, logger="mdn_scale.data"):
        loader = build_train_loader(DataConfig(datasets=[str(tmp_path / "m")], seq_len=16, skip_bad_shards=True))
        take(loader, 40)
    assert any(name in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="'nowhere' does not exist.*make_shards"):
        build_train_loader(DataConfig(datasets=["nowhere"], seq_len=16))
    with pytest.raises(ValueError, match="no file matches"):
        build_train_loader(DataConfig(datasets=[str(tmp_path / "m" / "nothing-*.tar")], seq_len=16))


def test_pipe_urls_and_url_template(shards, tmp_path):
    path, _ = shards
    m = read_manifest(os.path.join(path, "manifest.json"))
    n = len(m["shards"])
    cfg = dict(seq_len=48, micro_batch=2, seed=1, prefetch=0)
    local = take(build_train_loader(DataConfig(datasets=[path], **cfg)), 8)
    templ = take(build_train_loader(DataConfig(datasets=[{"path": path, "url_template": f"pipe:cat {path}/{{shard}}"}], **cfg)), 8)
    assert same(local, templ)
    # shards without a manifest, as a pipe: URL with braces: same documents (no counts to check)
    brace = f"pipe:cat {path}/shard-{{000000..{n - 1:06d}}}.tar"
    unshuffled = dict(cfg, shuffle=False, shard_interleave=1)
    a = take(build_train_loader(DataConfig(datasets=[brace], **unshuffled)), 8)
    b = take(build_train_loader(DataConfig(datasets=[path], **unshuffled)), 8)
    assert same(a, b)
    with pytest.raises(ShardError, match="no-such-shard"):
        take(build_train_loader(DataConfig(datasets=[f"pipe:cat {path}/no-such-shard.tar"], **cfg)), 1)


def test_manifest_may_not_name_commands(shards, tmp_path):
    path, _ = shards
    for bad in ("pipe:echo hi", "/etc/passwd", "../a.tar", "https://x/y.tar"):
        shutil.rmtree(tmp_path / "x", ignore_errors=True)
        shutil.copytree(path, tmp_path / "x")
        mp = tmp_path / "x" / "manifest.json"
        mp.write_text(mp.read_text().replace('"shard-000000.tar"', f'"{bad}"'))
        with pytest.raises(ValueError, match="not a relative path"):
            build_train_loader(DataConfig(datasets=[str(tmp_path / "x")], seq_len=16))


def test_cp_slice(shards):
    path, _ = shards
    batch = next(build_train_loader(DataConfig(datasets=[path], seq_len=24, micro_batch=3, prefetch=0)))
    for cp in (1, 2, 3, 4, 6):
        pieces = [cp_slice(batch, r, cp) for r in range(cp)]
        for k in ("tokens", "labels", "loss_mask"):
            assert all(p[k].shape == (1, 72 // cp) for p in pieces)
            assert torch.equal(torch.cat([p[k] for p in pieces], dim=1), batch[k].reshape(1, -1))
        assert all(p["cu_seqlens"] is batch["cu_seqlens"] for p in pieces)
    with pytest.raises(ValueError, match="do not divide by cp_size 5"):
        cp_slice(batch, 0, 5)
    with pytest.raises(ValueError, match="cp_rank"):
        cp_slice(batch, 2, 2)


def test_config_errors(shards):
    path, _ = shards
    for kw, msg in [
        (dict(datasets=[]), "datasets must be a non-empty list"),
        (dict(datasets=[{"path": path, "weight": 0}]), r"datasets\[0\]\.weight"),
        (dict(datasets=[{"path": path, "wieght": 1}]), r"unknown key\(s\) \['wieght'\]"),
        (dict(datasets=[path], seq_len=0), "seq_len"),
        (dict(datasets=[path], validation_fraction=1.0), "validation_fraction"),
        (dict(datasets=[path], holdout="rows"), "holdout"),
        (dict(datasets=[{"path": path, "url_template": "pipe:cat x"}]), "url_template"),
    ]:
        with pytest.raises(ValueError, match=msg):
            DataConfig(**kw)
    with pytest.raises(ValueError, match="dp_rank"):
        build_train_loader(DataConfig(datasets=[path]), 2, 2)
    with pytest.raises(ValueError, match="no validation data"):
        build_valid_loader(DataConfig(datasets=[path]))


def test_from_dict_names_the_key(shards):
    path, _ = shards
    cfg = DataConfig.from_dict({"datasets": [path], "seq_len": 8})
    assert cfg.seq_len == 8 and cfg.datasets[0].path == path
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['data\.seqlen'\]"):
        DataConfig.from_dict({"datasets": [path], "seqlen": 8})
    with pytest.raises(ValueError, match=r"^data\.micro_batch must be an integer >= 1"):
        DataConfig.from_dict({"datasets": [path], "micro_batch": "4"})


def test_error_persists_after_prefetch_failure(shards, tmp_path):
    path, _ = shards
    corrupt_copy(path, str(tmp_path / "c"), "garbage")
    loader = build_train_loader(DataConfig(datasets=[str(tmp_path / "c")], seq_len=64, shuffle=False, prefetch=2))
    for _ in range(2):  # raised again, not a hang
        with pytest.raises(ShardError, match="invalid header"):
            take(loader, 80)


def test_token_ids_beyond_manifest_vocab(shards, tmp_path):
    path, _ = shards
    shutil.copytree(path, tmp_path / "v")
    mp = tmp_path / "v" / "manifest.json"
    mp.write_text(mp.read_text().replace('"vocab_size": 257', '"vocab_size": 100'))
    with pytest.raises(ShardError, match="token ids >= the manifest's vocab_size 100"):
        next(build_train_loader(DataConfig(datasets=[str(tmp_path / "v")], seq_len=16, prefetch=0)))


def test_empty_splits_are_errors(tmp_path):
    from mdn_scale.data.datasets import _unit_hash

    make_shards([write_jsonl(tmp_path / "one.jsonl", ["only one document"])], str(tmp_path / "o"), progress=False)
    h = _unit_hash("shard-000000.tar/0000000000")  # the document is held out iff h < validation_fraction
    cfg = lambda f: DataConfig(datasets=[str(tmp_path / "o")], seq_len=8, validation_fraction=f, prefetch=0)  # noqa: E731
    with pytest.raises(ValueError, match="no documents in its training split"):
        next(build_train_loader(cfg((h + 1) / 2)))
    assert list(build_valid_loader(cfg((h + 1) / 2)))
    with pytest.raises(ValueError, match="validation data is empty"):
        list(build_valid_loader(cfg(h / 2)))
    assert next(build_train_loader(cfg(h / 2)))


def test_close_rewinds_and_dropped_loaders_stop_their_thread(shards):
    import gc
    import threading

    path, _ = shards
    cfg = DataConfig(datasets=[path], seq_len=32, micro_batch=2, prefetch=4)
    full = take(build_train_loader(cfg), 8)
    loader = build_train_loader(cfg)
    assert same(take(loader, 3), full[:3])
    loader.close()  # the thread had read ahead; iteration continues where the batches handed out end
    assert same(take(loader, 5), full[3:])
    del loader
    gc.collect()
    threading.Event().wait(0.3)
    assert not [t for t in threading.enumerate() if t.name == "mdn-data-prefetch"]
