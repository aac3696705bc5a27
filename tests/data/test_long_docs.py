"""Long-context data: length filters, up-sampling of long documents, keep_whole packing, and
exact resume with all of them on (real shards made with make_shards, byte tokenizer)."""

import json

import numpy as np
import pytest

from data_helpers import write_text_folder
from mdn_scale.data import DataConfig, build_train_loader, build_valid_loader, make_shards
from mdn_scale.data.long_docs import length_filter, starts_next_sequence, upsample_long
from mdn_scale.data.tokenizer import BYTE_EOD_ID

T = 64


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Documents of 10..110 bytes (+ end-of-document), each a distinct repeated letter pattern."""
    d = tmp_path_factory.mktemp("long_docs")
    texts = []
    for i in range(60):
        n = 10 + (i * 37) % 101
        texts.append((f"<{i:03d}>" + "abcdefghij"[i % 10] * n)[:n])
    src = write_text_folder(d / "src", texts)
    out = str(d / "shards")
    make_shards([src], out, max_docs_per_shard=15, progress=False)
    return out, {t: len(t.encode()) + 1 for t in texts}


def docs_of_rows(batches):
    """(row index, tokens) of every segment of every row: its inputs, and for the row's last
    segment (before the end or the padding) also the final label (so a whole document ends with
    its end id)."""
    out = []
    r = 0
    for b in batches:
        B = b["tokens"].shape[0]
        cu = b["cu_seqlens"].tolist()
        for row in range(B):
            lo, hi = row * T, (row + 1) * T
            starts = [c for c in cu if lo <= c < hi]
            toks = b["tokens"][row].tolist()
            labs = b["labels"][row].tolist()
            mask = b["loss_mask"][row].tolist()
            for s, e in zip(starts, starts[1:] + [hi]):
                if not mask[s - lo]:
                    continue  # padding
                seg = [t for t, m in zip(toks[s - lo:e - lo], mask[s - lo:e - lo]) if m]
                if e == hi or not mask[e - lo]:
                    seg.append(labs[e - lo - 1])  # the row's last label ends its last segment
                out.append((r + row, seg))
        r += B
    return out


def test_pure_functions():
    docs = [np.zeros(n) for n in (3, 10, 50, 100)]
    assert [len(d) for d in length_filter(docs, 10, 50)] == [10, 50]
    assert [len(d) for d in length_filter(docs, 11)] == [50, 100]
    assert [len(d) for d in upsample_long(docs, 50, 3)] == [3, 10, 50, 50, 50, 100, 100, 100]
    assert [len(d) for d in upsample_long(docs, 50, 1)] == [3, 10, 50, 100]
    assert not starts_next_sequence(100, 0, 65)  # an empty sequence takes any document
    assert starts_next_sequence(30, 40, 65) and not starts_next_sequence(25, 40, 65)


def test_length_filter_and_upsampling(shards):
    path, lengths = shards
    base = dict(seq_len=T, micro_batch=4, seed=3, prefetch=0, shuffle=False, shard_interleave=1)
    cfg = DataConfig(datasets=[{"path": path, "min_doc_tokens": 30, "max_doc_tokens": 90}], **base)
    loader = build_train_loader(cfg)
    stream = np.concatenate([b["tokens"].reshape(-1).numpy() for b in [next(loader) for _ in range(10)]])
    ends = np.flatnonzero(stream == BYTE_EOD_ID)
    doc_lens = np.diff(ends)  # complete documents between two ends (each + its end id)
    assert len(doc_lens) > 5 and doc_lens.min() >= 30 and doc_lens.max() <= 90

    # up-sampling: one epoch reads each long document `factor` times, each short one once
    up = DataConfig(datasets=[{"path": path, "upsample_min_tokens": 80, "upsample_factor": 3}], **base)
    from mdn_scale.data.datasets import resolve_dataset
    from mdn_scale.data.long_docs import document_transform
    from mdn_scale.data.stream import DocSource

    ds = resolve_dataset(up.datasets[0], False)
    src = DocSource(ds, 0, 3, shard_ids=range(len(ds.shards)), loop=False,
                    transform=document_transform(up.datasets[0], training=True))
    counts = {}
    while (d := src.next_doc()) is not None:
        counts[len(d)] = counts.get(len(d), 0) + 1
    want = {}
    for n in lengths.values():
        want[n] = want.get(n, 0) + (3 if n >= 80 else 1)
    assert counts == want
    # validation reads are not up-sampled
    assert document_transform(up.datasets[0], training=False) is None

    with pytest.raises(ValueError, match=r"datasets\[0\].max_doc_tokens = 5 is below min_doc_tokens"):
        DataConfig(datasets=[{"path": path, "min_doc_tokens": 10, "max_doc_tokens": 5}])
    with pytest.raises(ValueError, match=r"upsample_factor must be an integer >= 1"):
        DataConfig(datasets=[{"path": path, "upsample_factor": 0}])
    with pytest.raises(ValueError, match="packing must be one of"):
        DataConfig(datasets=[path], packing="whole")


def test_keep_whole_packing_and_exact_resume(shards):
    path, lengths = shards
    cfg = DataConfig(datasets=[{"path": path, "upsample_min_tokens": 90, "upsample_factor": 2}],
                     seq_len=T, micro_batch=2, seed=5, prefetch=0, packing="keep_whole", shard_interleave=2)
    loader = build_train_loader(cfg)
    batches = [next(loader) for _ in range(30)]
    segs = docs_of_rows(batches)
    full = {n for n in lengths.values()}
    whole, cut = 0, 0
    for row, seg in segs:
        if not seg:
            continue
        if seg[-1] == BYTE_EOD_ID and seg[0] == ord("<"):
            whole += 1
            assert len(seg) in full
        else:
            cut += 1
    # every document that fits a row (<= T+1 tokens) lies whole in one row: pieces only come
    # from documents longer than a row
    short_docs_in_pieces = [seg for _, seg in segs if seg and seg[0] == ord("<") and seg[-1] != BYTE_EOD_ID
                            and _doc_len(seg, lengths) <= T + 1]
    assert short_docs_in_pieces == []
    assert whole > 20 and cut > 0
    # padding exists (rows end short) and is masked out
    masks = np.concatenate([b["loss_mask"].numpy().reshape(-1) for b in batches])
    assert 0 < (masks == 0).sum() < masks.size // 2

    # concat packing of the same data cuts short documents across rows
    cat = build_train_loader(DataConfig(**{**cfg.to_dict(), "packing": "concat",
                                           "datasets": [cfg.datasets[0].__dict__]}))
    cat_segs = docs_of_rows([next(cat) for _ in range(30)])
    assert any(seg and seg[0] == ord("<") and seg[-1] != BYTE_EOD_ID and _doc_len(seg, lengths) <= T
               for _, seg in cat_segs)

    # exact resume at any point, through JSON
    loader2 = build_train_loader(cfg)
    for _ in range(11):
        next(loader2)
    state = json.loads(json.dumps(loader2.state_dict()))
    loader3 = build_train_loader(cfg)
    loader3.load_state_dict(state)
    for k in range(11, 30):
        b = next(loader3)
        for key in ("tokens", "labels", "loss_mask", "cu_seqlens"):
            assert b[key].equal(batches[k][key]), (k, key)
    # a state saved under another packing is refused by name
    other = build_train_loader(DataConfig(**{**cfg.to_dict(), "packing": "concat",
                                             "datasets": [cfg.datasets[0].__dict__]}))
    with pytest.raises(ValueError, match="packing"):
        other.load_state_dict(state)

    # validation with keep_whole: finite, every row's documents whole or row-start pieces
    val = DataConfig(datasets=[path], valid_datasets=[path], seq_len=T, micro_batch=2, packing="keep_whole")
    vsegs = docs_of_rows(list(build_valid_loader(val)))
    assert [s for _, s in vsegs if s and s[0] == ord("<") and s[-1] != BYTE_EOD_ID and _doc_len(s, lengths) <= T + 1] == []


def _doc_len(seg, lengths):
    """The full length of the document whose start is `seg` (documents start with a unique tag)."""
    tag = bytes(seg[:5]).decode()
    return next(n for t, n in lengths.items() if t.startswith(tag))
