"""make_shards: round trips, manifest counts, tokenizers, determinism, the stdlib default, bad input."""

import os
import sys

import numpy as np
import pytest
from data_helpers import corpus, decode_bytes, write_jsonl, write_text_folder

from mdn_scale.data import BYTE_EOD_ID, load_manifest_tokenizer, make_shards
from mdn_scale.data.format import read_manifest, read_shard
from mdn_scale.data.make_shards import main, stdlib_files


def read_all(manifest_path):
    """[(shard entry, [token arrays])] of a build, checking its files against the manifest."""
    m = read_manifest(manifest_path)
    base = os.path.dirname(manifest_path)
    return m, [(s, [d for _, d in read_shard(os.path.join(base, s["name"]))]) for s in m["shards"]]


def test_bytes_round_trip_and_manifest_counts(tmp_path):
    texts = corpus(60, seed=1)
    texts_b = corpus(15, seed=2, tag="jl")
    write_text_folder(tmp_path / "in" / "txt", texts)
    write_jsonl(tmp_path / "in" / "more.jsonl", texts_b)
    (tmp_path / "in" / "ignored.bin").write_bytes(b"\x00\x01")  # not a known suffix: not read
    mp = make_shards([str(tmp_path / "in")], str(tmp_path / "out"), shard_size_mb=0.002, progress=False)
    m, shards = read_all(mp)
    assert len(shards) > 3  # small shard size: several shards
    docs = [d for _, ds in shards for d in ds]
    # folder walked in sorted order: more.jsonl (lines) before txt/f0000.txt ...
    assert [decode_bytes(d) for d in docs] == texts_b + texts
    assert all(d[-1] == BYTE_EOD_ID and (d[:-1] != BYTE_EOD_ID).all() for d in docs)
    assert all(d.dtype == np.dtype("<u2") for d in docs)
    for s, ds in shards:
        assert s["documents"] == len(ds) and s["tokens"] == sum(len(d) for d in ds)
    assert m["documents"] == len(docs) == 75
    assert m["tokens"] == sum(len(d) for d in docs) == sum(len(t.encode()) + 1 for t in texts + texts_b)
    assert m["tokenizer"]["kind"] == "bytes" and m["tokenizer"]["vocab_size"] == 257 and m["tokenizer"]["eod_id"] == 256
    assert m["format_version"] == 1 and m["token_field"] == "tokens.u16"


def test_line_split_and_jsonl_field(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond line é\nthird\n", encoding="utf-8")
    mp = make_shards([str(tmp_path / "a.txt")], str(tmp_path / "o1"), text_split="line", progress=False)
    m, shards = read_all(mp)
    assert [decode_bytes(d) for _, ds in shards for d in ds] == ["first line", "second line é", "third"]
    assert m["build"]["skipped"]["empty_documents"] == 2
    p = write_jsonl(tmp_path / "b.jsonl", ["x", "yy"], field="content")
    with pytest.raises(ValueError, match=r"b\.jsonl:1: field 'text' is missing"):
        make_shards([p], str(tmp_path / "o2"), progress=False)
    mp = make_shards([p], str(tmp_path / "o3"), field="content", progress=False)
    assert [decode_bytes(d) for _, ds in read_all(mp)[1] for d in ds] == ["x", "yy"]


def tiny_bpe(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(30, seed=5), trainer=trainer)
    tok.save(str(path))
    return str(path)


def test_hf_tokenizer_round_trip(tmp_path):
    tpath = tiny_bpe(tmp_path / "tok.json")
    texts = corpus(25, seed=7)
    src = write_jsonl(tmp_path / "in.jsonl", texts)
    mp = make_shards([src], str(tmp_path / "out"), tokenizer=tpath, progress=False)
    m, shards = read_all(mp)
    tok = load_manifest_tokenizer(mp)
    docs = [d for _, ds in shards for d in ds]
    eod = m["tokenizer"]["eod_id"]
    assert eod == tok.eod_id and m["tokenizer"]["eod_token"] == "<|endoftext|>"
    assert all(d[-1] == eod for d in docs)
    assert [tok.decode(d) for d in docs] == texts
    assert sum(len(d) for d in docs) < sum(len(t.encode()) for t in texts)  # BPE merged something
    import hashlib

    with open(tpath, "rb") as f:
        assert m["tokenizer"]["sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert m["tokenizer"]["vocab_size"] == tok.vocab_size <= 300
    assert os.path.isfile(tmp_path / "out" / "tokenizer.json")
    # the loader reports the manifest's tokenizer, and refuses to mix shards of two tokenizers
    from mdn_scale.data import DataConfig, build_train_loader

    loader = build_train_loader(DataConfig(datasets=[str(tmp_path / "out")], seq_len=16, prefetch=0))
    assert (loader.vocab_size, loader.eod_id) == (tok.vocab_size, eod)
    assert int(next(loader)["tokens"].max()) < tok.vocab_size
    make_shards([src], str(tmp_path / "bytes"), progress=False)
    with pytest.raises(ValueError, match="different tokenizers"):
        build_train_loader(DataConfig(datasets=[str(tmp_path / "out"), str(tmp_path / "bytes")], seq_len=16))
    with pytest.raises(ValueError, match="no end-of-document token 'NOPE'"):
        make_shards([src], str(tmp_path / "o2"), tokenizer=tpath, eod_token="NOPE", progress=False)


def test_deterministic_and_rebuild_rules(tmp_path):
    src = write_text_folder(tmp_path / "in", corpus(40, seed=3))
    a = make_shards([src], str(tmp_path / "a"), shard_size_mb=0.003, progress=False)
    make_shards([src], str(tmp_path / "b"), shard_size_mb=0.003, progress=False)
    names = sorted(f for f in os.listdir(tmp_path / "a") if not f.startswith("."))
    assert names == sorted(f for f in os.listdir(tmp_path / "b") if not f.startswith("."))
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
    # same inputs and options again: nothing is rewritten
    before = {n: os.stat(tmp_path / "a" / n).st_mtime_ns for n in names}
    assert make_shards([src], str(tmp_path / "a"), shard_size_mb=0.003, progress=False) == a
    assert before == {n: os.stat(tmp_path / "a" / n).st_mtime_ns for n in names}
    # different options into a built folder: refused, unless overwrite
    with pytest.raises(ValueError, match="holds a different build"):
        make_shards([src], str(tmp_path / "a"), shard_size_mb=1, progress=False)
    make_shards([src], str(tmp_path / "a"), shard_size_mb=1, overwrite=True, progress=False)
    assert sorted(f for f in os.listdir(tmp_path / "a") if not f.startswith(".")) == ["manifest.json", "shard-000000.tar"]


def test_concurrent_builds_of_one_folder(tmp_path):
    """Every rank of a job may call make_shards(): one builds, the others wait and reuse it."""
    import threading

    src = write_text_folder(tmp_path / "in", corpus(40, seed=4))
    make_shards([src], str(tmp_path / "ref"), shard_size_mb=0.003, progress=False)
    results, errors = [], []

    def build():
        try:
            results.append(make_shards([src], str(tmp_path / "out"), shard_size_mb=0.003, progress=False))
        except Exception as exn:  # collected: a thread's exception would otherwise be lost
            errors.append(exn)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3
    for n in os.listdir(tmp_path / "ref"):
        assert (tmp_path / "ref" / n).read_bytes() == (tmp_path / "out" / n).read_bytes(), n


def test_stdlib_default(tmp_path):
    mp = make_shards(output=str(tmp_path / "std"), progress=False)
    m = read_manifest(mp)
    assert m["build"]["options"]["on_decode_error"] == "skip"
    _, files = stdlib_files()
    assert m["documents"] > 500 and len(m["shards"]) > 2
    assert not any("site-packages" in f for f in files)
    first = read_shard(os.path.join(tmp_path / "std", m["shards"][0]["name"]))[0][1]
    # document 0 is the first non-empty file in sorted order
    for f in files:
        with open(f, encoding="utf-8") as fh:
            expect = fh.read()
        if expect:
            break
    assert decode_bytes(first) == expect


def test_cli(tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", corpus(5))
    assert main([src, "-o", str(tmp_path / "out"), "--quiet"]) == 0
    assert read_manifest(str(tmp_path / "out" / "manifest.json"))["documents"] == 5
    assert main([str(tmp_path / "missing.txt"), "-o", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "make_shards: error: input" in err and "missing.txt' does not exist" in err


def test_bad_inputs(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: not UTF-8"):
        make_shards([str(tmp_path / "latin1.txt")], str(tmp_path / "o"), progress=False)
    with pytest.raises(ValueError, match="does not exist"):
        make_shards([str(tmp_path / "nope")], str(tmp_path / "o"), progress=False)
    with pytest.raises(ValueError, match="output folder not given"):
        make_shards([str(tmp_path / "latin1.txt")], progress=False)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not a JSON line"):
        make_shards([str(tmp_path / "bad.jsonl")], str(tmp_path / "o"), progress=False)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no non-empty documents"):
        make_shards([str(tmp_path / "empty.jsonl")], str(tmp_path / "o3"), progress=False)
    assert not [f for f in os.listdir(tmp_path / "o3") if f.endswith(".tar")]  # nothing half-built left


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ValueError, match=r"x\.parquet.*needs pyarrow: pip install pyarrow"):
        make_shards([str(tmp_path / "x.parquet")], str(tmp_path / "o"), progress=False)


def test_parquet_round_trip(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is an optional dependency (mdn_scale[parquet]); not installed")
    import pyarrow.parquet as pq

    texts = corpus(30, seed=9)
    pq.write_table(pa.table({"body": texts, "n": list(range(30))}), tmp_path / "t.parquet", row_group_size=7)
    mp = make_shards([str(tmp_path / "t.parquet")], str(tmp_path / "o"), field="body", progress=False)
    assert [decode_bytes(d) for _, ds in read_all(mp)[1] for d in ds] == texts
    with pytest.raises(ValueError, match="no column 'text'"):
        make_shards([str(tmp_path / "t.parquet")], str(tmp_path / "o2"), progress=False)
