"""Documents -> packed sequences, as deterministic state machines with small, exact states.

DocSource: the documents of one dataset split. Per epoch e, the shard order is a permutation
seeded by (seed, dataset, e); `interleave` shards are open at once (each read whole, its
documents permuted by (seed, dataset, e, shard)), and each next document is drawn from the open
shards with probability proportional to the documents they have left (a seeded generator).
The state is (epoch, next shard, open shards with their cursors, generator state): restoring it
re-reads only the open shards.

Packer: concatenates one source's documents (each ends with its end-of-document id) and cuts
sequences of T+1 tokens; consecutive sequences overlap by one token (the last label of one is
the first input of the next), so every token but the first is a label once. It records where
documents start inside each sequence. Its state is the source state from just before the current
document was drawn, plus the offset into that document.

SequenceStream: the training mixture. Global sequence j comes from dataset d(j), drawn with the
weights by a generator seeded with (seed, j // 4096): a pure function of j, so the stream's state is
just j and the packers' states. Every data-parallel rank runs the same stream; the loader keeps
sequence j on rank j mod dp (loader.py), so the global batch does not depend on the layout.
"""

from __future__ import annotations

import logging

import numpy as np

from .datasets import ResolvedDataset
from .format import ShardError, read_shard
from .long_docs import PACKINGS, starts_next_sequence

log = logging.getLogger("mdn_scale.data")

# Tags that keep the seeded generators of different purposes apart.
_SHARD_ORDER, _DOC_ORDER, _PICK, _MIX = 1, 2, 3, 4


def _rng(*words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) for w in words])))


class DocSource:
    """Documents (token arrays) of one dataset split: forever (loop) or one pass.

    shard_ids: indices into ds.shards this split reads. keep(shard_name, key) -> bool: the
    document-level split filter (None: keep all). transform(docs) -> docs: the shard's documents
    after the split filter, before shuffling (long_docs.document_transform: length filters and
    up-sampling); a pure function of the list, so cursors into its result resume exactly.
    """

    def __init__(self, ds: ResolvedDataset, ds_index: int, seed: int, *, shard_ids, keep=None,
                 interleave: int = 1, shuffle: bool = False, loop: bool = False,
                 skip_bad_shards: bool = False, split: str = "train", transform=None):
        self.ds, self.ds_index, self.seed = ds, ds_index, seed
        self.shard_ids = list(shard_ids)
        self.keep, self.interleave, self.shuffle, self.loop = keep, interleave, shuffle, loop
        self.transform = transform
        self.skip_bad_shards, self.split = skip_bad_shards, split
        self._docs: dict[int, list[np.ndarray]] = {}  # open shards: position in epoch order -> docs
        self._start_epoch(0)

    # -- state ------------------------------------------------------------------------------
    def _start_epoch(self, epoch: int) -> None:
        self.epoch, self.next_pos, self.slots, self.docs_in_epoch = epoch, 0, [], 0
        self._docs.clear()
        n = len(self.shard_ids)
        perm = _rng(self.seed, self.ds_index, epoch, _SHARD_ORDER).permutation(n) if self.shuffle else np.arange(n)
        self.order = [self.shard_ids[i] for i in perm]
        self.pick = _rng(self.seed, self.ds_index, epoch, _PICK)

    def state(self) -> dict:
        return {
            "epoch": self.epoch, "next": self.next_pos, "slots": [list(s) for s in self.slots],
            "docs_in_epoch": self.docs_in_epoch, "rng": self.pick.bit_generator.state,
        }

    def load_state(self, st: dict) -> None:
        self._start_epoch(int(st["epoch"]))
        self.next_pos, self.docs_in_epoch = int(st["next"]), int(st["docs_in_epoch"])
        self.pick.bit_generator.state = st["rng"]
        for pos, cursor in st["slots"]:
            docs = self._load(pos)
            if docs is not None and cursor < len(docs):
                self.slots.append([pos, cursor])
                self._docs[pos] = docs

    # -- reading ----------------------------------------------------------------------------
    def _load(self, pos: int):
        """Documents of the shard at `pos` of this epoch's order, in reading order; None: skipped."""
        sid = self.order[pos]
        ref = self.ds.shards[sid]
        try:
            docs = read_shard(ref.url, ref.documents, ref.tokens)
        except ShardError as exn:
            if not self.skip_bad_shards:
                raise
            log.warning("skipping %s (skip_bad_shards is on)", exn)
            return None
        vocab = self.ds.tokenizer["vocab_size"] if self.ds.tokenizer else None
        if vocab is not None and any(len(d) and int(d.max()) >= vocab for _, d in docs):
            exn = ShardError(ref.url, f"holds token ids >= the manifest's vocab_size {vocab}")
            if not self.skip_bad_shards:
                raise exn
            log.warning("skipping %s (skip_bad_shards is on)", exn)
            return None
        if self.keep is not None:
            docs = [(k, d) for k, d in docs if self.keep(ref.name, k)]
        docs = [d for _, d in docs if len(d)]
        if self.transform is not None:
            docs = self.transform(docs)
        if self.shuffle:
            perm = _rng(self.seed, self.ds_index, self.epoch, _DOC_ORDER, sid).permutation(len(docs))
            docs = [docs[i] for i in perm]
        return docs or None

    def _fill(self) -> None:
        while len(self.slots) < self.interleave and self.next_pos < len(self.order):
            pos = self.next_pos
            self.next_pos += 1
            docs = self._load(pos)
            if docs is not None:
                self._docs[pos] = docs
                self.slots.append([pos, 0])

    def next_doc(self):
        """The next document (uint16/uint32 array), or None when a one-pass source is done."""
        while True:
            self._fill()
            if self.slots:
                break
            if not self.loop:
                return None
            if self.docs_in_epoch == 0:
                raise ValueError(
                    f"dataset {self.ds.label!r}: no documents in its {self.split} split "
                    "(every shard empty, held out or skipped)"
                )
            self._start_epoch(self.epoch + 1)
        left = [len(self._docs[pos]) - cur for pos, cur in self.slots]
        r = int(self.pick.integers(sum(left)))
        i = int(np.searchsorted(np.cumsum(left), r, side="right"))
        pos, cur = self.slots[i]
        doc = self._docs[pos][cur]
        self.slots[i][1] += 1
        if self.slots[i][1] == len(self._docs[pos]):
            del self.slots[i]
            del self._docs[pos]
        self.docs_in_epoch += 1
        return doc


class Packer:
    """Cuts one source's document stream into sequences of `length` (= T+1) tokens.

    packing "concat" (the default) cuts every `length` tokens; "keep_whole" moves a document that
    does not fit in the rest of a sequence to the next one and ends this one short (padding).
    """

    def __init__(self, source: DocSource, length: int, packing: str = "concat"):
        if packing not in PACKINGS:
            raise ValueError(f"packing must be one of {PACKINGS} (got {packing!r})")
        self.source, self.length, self.packing = source, length, packing
        self.doc, self.offset, self.doc_state = None, 0, None

    def state(self) -> dict:
        if self.doc is None:
            return {"source": self.source.state(), "has_doc": False, "offset": 0}
        return {"source": self.doc_state, "has_doc": True, "offset": self.offset}

    def load_state(self, st: dict) -> None:
        self.source.load_state(st["source"])
        self.doc, self.offset, self.doc_state = None, 0, None
        if st["has_doc"]:
            self.doc_state = st["source"]
            self.doc = self.source.next_doc()
            self.offset = int(st["offset"])

    def next(self, materialize: bool = True):
        """(tokens int64 [n] or None unless materialize, document starts [positions]) or None at the
        end of a one-pass source. n == length except for a one-pass source's last sequence."""
        parts, starts, filled = [], [], 0
        while filled < self.length:
            if self.doc is None or self.offset >= len(self.doc):
                state = self.source.state()
                doc = self.source.next_doc()
                if doc is None:
                    self.doc = None
                    break
                self.doc, self.doc_state, self.offset = doc, state, 0
            if self.offset == 0 and self.packing == "keep_whole" and \
                    starts_next_sequence(len(self.doc), filled, self.length):
                if filled > 1:
                    break  # pad the rest; the document (offset 0) opens the next sequence
                # only the previous sequence's last token is here: drop it, start the document
                parts, starts, filled = [], [], 0
            if self.offset == 0:
                starts.append(filled)
            take = min(self.length - filled, len(self.doc) - self.offset)
            if materialize:
                parts.append(self.doc[self.offset:self.offset + take])
            self.offset += take
            filled += take
        if filled < 2:  # nothing left to predict
            return None
        if filled == self.length:
            self.offset -= 1  # the last label is the next sequence's first input
        tokens = np.concatenate(parts).astype(np.int64) if materialize else None
        return tokens, starts


class SequenceStream:
    """The weighted mixture of several packers; sequence j's dataset is a pure function of (seed, j)."""

    def __init__(self, packers: list[Packer], weights: list[float], seed: int):
        self.packers, self.seed = packers, seed
        w = np.asarray(weights, dtype=np.float64)
        self.cum = np.cumsum(w / w.sum())
        self.count = 0

    _BLOCK = 4096  # draws are made per block of sequences: (seed, block) seeds the block's generator

    def dataset_of(self, j: int) -> int:
        if len(self.packers) == 1:
            return 0
        block = j // self._BLOCK
        if getattr(self, "_block", None) != block:
            u = _rng(self.seed, _MIX, block).random(self._BLOCK)
            self._choices = np.minimum(np.searchsorted(self.cum, u, side="right"), len(self.packers) - 1)
            self._block = block
        return int(self._choices[j % self._BLOCK])

    def next(self, materialize: bool = True):
        d = self.dataset_of(self.count)
        self.count += 1
        item = self.packers[d].next(materialize)
        if item is None:
            raise RuntimeError("a looping training source ended")  # cannot happen: sources loop
        return item

    def state(self) -> dict:
        return {"count": self.count, "packers": [p.state() for p in self.packers]}

    def load_state(self, st: dict) -> None:
        if len(st["packers"]) != len(self.packers):
            raise ValueError(f"loader state has {len(st['packers'])} datasets, the config {len(self.packers)}")
        self.count = int(st["count"])
        for p, s in zip(self.packers, st["packers"]):
            p.load_state(s)
