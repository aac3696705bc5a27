"""Train and validation loaders: micro-batches for one data-parallel rank, and the CP slice.

A micro-batch is a dict:
    tokens     [B, T] int64    inputs
    labels     [B, T] int64    tokens shifted by one (labels[b, t] follows tokens[b, t])
    loss_mask  [B, T] float32  1 where the label counts, 0 on padding (validation's last rows)
    cu_seqlens [N+1]  int32    segment boundaries of the micro-batch flattened to one stream of
                               B·T tokens: every row start b·T, every document start inside a row
                               when reset_at_doc_boundary, the start of a padded tail, and B·T.
                               The MDN op restarts its state at each (mdn_chunk's cu_seqlens,
                               which wants the flattened [1, B·T] form: cp_slice(batch, 0, 1)).

Data-parallel split: every rank runs the same global sequence stream and keeps sequence j when
j mod dp_size == dp_rank, so global batch k is sequences [k·G, (k+1)·G) whatever dp_size and B
are (the same-loss-under-any-layout contract, DESIGN.md §8). The cost: each rank reads all the
data (token ids only; a 400M model on 8 GPUs needs about 1 MB/s per rank).

Resume: `state_dict()` is the global stream's position after the micro-batches handed out; it
is identical on every rank at a step boundary, holds only JSON types, and loads into a loader
of any dp_size, micro_batch or prefetch: the next batches are what the uninterrupted run would
have produced (under a new layout: what a run with that layout would have produced from there).
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import weakref

import numpy as np
import torch

from .config import DataConfig
from .datasets import check_same_tokenizer, document_held_out, held_out_shards, resolve_dataset
from .long_docs import document_transform, spec_fingerprint
from .stream import DocSource, Packer, SequenceStream

STATE_FORMAT = "mdn_scale.data.loader"
STATE_VERSION = 1


def _check_rank(dp_rank, dp_size):
    if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1:
        raise ValueError(f"dp_size must be an integer >= 1 (got {dp_size!r})")
    if isinstance(dp_rank, bool) or not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be an integer in [0, {dp_size}) (got {dp_rank!r})")


def make_batch(rows, seq_len: int, reset_at_doc_boundary: bool, pad_id: int = 0) -> dict:
    """rows: B items, each (tokens int64 [n <= T+1], document starts) or None (a padding row)."""
    B, T = len(rows), seq_len
    tokens = np.full((B, T), pad_id, dtype=np.int64)
    labels = np.zeros((B, T), dtype=np.int64)
    mask = np.zeros((B, T), dtype=np.float32)
    bounds = {B * T}
    for b, row in enumerate(rows):
        bounds.add(b * T)
        if row is None:
            continue
        seq, starts = row
        n = len(seq) - 1  # input positions with a label
        tokens[b, :n] = seq[:-1]
        labels[b, :n] = seq[1:]
        mask[b, :n] = 1.0
        if n < T:
            bounds.add(b * T + n)  # padding is a segment of its own
        if reset_at_doc_boundary:
            bounds.update(b * T + s for s in starts if 0 < s < n)
    return {
        "tokens": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        "loss_mask": torch.from_numpy(mask),
        "cu_seqlens": torch.tensor(sorted(bounds), dtype=torch.int32),
    }


def cp_slice(batch: dict, cp_rank: int, cp_size: int) -> dict:
    """This context-parallel rank's contiguous 1/cp_size of the micro-batch flattened to one
    stream: tokens, labels, loss_mask [1, B·T/cp_size]; cu_seqlens unchanged (global offsets
    into the B·T stream, as the MDN CP op takes them). cp_size = 1 gives the flattened batch."""
    if isinstance(cp_size, bool) or not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"cp_size must be an integer >= 1 (got {cp_size!r})")
    if isinstance(cp_rank, bool) or not isinstance(cp_rank, int) or not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be an integer in [0, {cp_size}) (got {cp_rank!r})")
    B, T = batch["tokens"].shape
    n = B * T
    if n % cp_size:
        raise ValueError(f"cp_slice: the micro-batch's B·T = {B}·{T} = {n} tokens do not divide by cp_size {cp_size}")
    piece = n // cp_size
    lo, hi = cp_rank * piece, (cp_rank + 1) * piece
    out = {k: batch[k].reshape(1, n)[:, lo:hi].contiguous() for k in ("tokens", "labels", "loss_mask")}
    out["cu_seqlens"] = batch["cu_seqlens"]
    return out


class _Prefetcher:
    """Runs a (batch, state) generator in a background thread, `depth` items ahead."""

    def __init__(self, gen, depth: int):
        self.q: queue.Queue = queue.Queue(depth)
        self.stop = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=self._run, args=(gen,), daemon=True, name="mdn-data-prefetch")
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _run(self, gen):
        try:
            for item in gen:
                if not self._put(("ok", item)):
                    return
        except BaseException as exn:  # handed to the consumer, raised there
            self._put(("error", exn))

    def get(self):
        if self.error is not None:  # the producer is gone: keep raising its error
            raise self.error
        kind, item = self.q.get()
        if kind == "error":
            self.error = item
            raise item
        return item

    def close(self):
        self.stop.set()
        self.thread.join()


def _train_batches(stream: SequenceStream, B: int, dp: int, me: int, seq_len: int, reset: bool, pad: int):
    """(micro-batch, stream state after it) forever: B rows, each the dp_rank-th of a round of dp sequences."""
    while True:
        rows = []
        for _ in range(B):
            for q in range(dp):
                item = stream.next(materialize=q == me)
                if q == me:
                    rows.append(item)
        yield make_batch(rows, seq_len, reset, pad), stream.state()


class _Base:
    def __init__(self, cfg: DataConfig, dp_rank: int, dp_size: int):
        if not isinstance(cfg, DataConfig):
            raise ValueError(f"cfg must be a DataConfig (got {type(cfg).__name__})")
        cfg.check()
        _check_rank(dp_rank, dp_size)
        self.cfg, self.dp_rank, self.dp_size = cfg, dp_rank, dp_size
        self.train_sets = [resolve_dataset(s, cfg.skip_bad_shards) for s in cfg.datasets]
        self.valid_sets = [resolve_dataset(s, cfg.skip_bad_shards) for s in cfg.valid_datasets]
        #: the manifests' tokenizer identity (kind, name, sha256, vocab_size, eod_id), or None
        self.tokenizer = check_same_tokenizer(self.train_sets + self.valid_sets)
        self.vocab_size = self.tokenizer["vocab_size"] if self.tokenizer else None
        self.eod_id = self.tokenizer["eod_id"] if self.tokenizer else None
        f = cfg.validation_fraction
        self._held_out = [held_out_shards(d, f) if cfg.holdout == "shards" else set() for d in self.train_sets]

    def _split(self, i: int, validation: bool):
        """(shard ids, document filter) of train dataset i's training or held-out part."""
        ds, f = self.train_sets[i], self.cfg.validation_fraction
        if self.cfg.holdout == "shards":
            held = self._held_out[i]
            return [s for s in range(len(ds.shards)) if (s in held) == validation], None
        ids, keep = list(range(len(ds.shards))), None
        if f > 0:
            keep = (lambda n, k: document_held_out(n, k, f)) if validation else (lambda n, k: not document_held_out(n, k, f))
        return ids, keep


class TrainLoader(_Base):
    """Endless micro-batches of one data-parallel rank (see the module docstring)."""

    def __init__(self, cfg: DataConfig, dp_rank: int, dp_size: int):
        super().__init__(cfg, dp_rank, dp_size)
        self._stream = self._new_stream()
        self._consumed = self._stream.state()
        self._prefetch = None
        self._gen = None

    def _new_stream(self) -> SequenceStream:
        c = self.cfg
        packers = []
        for i, ds in enumerate(self.train_sets):
            ids, keep = self._split(i, validation=False)
            src = DocSource(ds, i, c.seed, shard_ids=ids, keep=keep, interleave=c.shard_interleave,
                            shuffle=c.shuffle, loop=True, skip_bad_shards=c.skip_bad_shards, split="training",
                            transform=document_transform(c.datasets[i], training=True))
            packers.append(Packer(src, c.seq_len + 1, c.packing))
        return SequenceStream(packers, [d.weight for d in self.train_sets], c.seed)

    def _fingerprint(self) -> dict:
        """What must match for a saved position to mean the same thing here. Not the paths: data
        moved elsewhere (or read through a url_template) resumes."""
        c = self.cfg
        sets = []
        for d, spec in zip(self.train_sets, c.datasets):
            h = hashlib.sha256(json.dumps([[s.name, s.documents, s.tokens] for s in d.shards]).encode()).hexdigest()
            sets.append({"weight": d.weight, "shards": h[:16], **spec_fingerprint(spec)})
        out = {"seq_len": c.seq_len, "seed": c.seed, "shuffle": c.shuffle, "shard_interleave": c.shard_interleave,
               "validation_fraction": c.validation_fraction, "holdout": c.holdout, "datasets": sets}
        if c.packing != "concat":  # left out at the default: states saved before it existed still load
            out["packing"] = c.packing
        return out

    def _batches(self):
        # Holds the stream, not the loader: a loader dropped without close() is still collected,
        # and its finalizer stops the prefetch thread.
        c = self.cfg
        return _train_batches(self._stream, c.micro_batch, self.dp_size, self.dp_rank, c.seq_len,
                              c.reset_at_doc_boundary, self.eod_id or 0)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.cfg.prefetch > 0:
            if self._prefetch is None:
                self._prefetch = _Prefetcher(self._batches(), self.cfg.prefetch)
                self._finalizer = weakref.finalize(self, self._prefetch.close)
            batch, state = self._prefetch.get()
        else:
            if self._gen is None:
                self._gen = self._batches()
            batch, state = next(self._gen)
        self._consumed = state
        return batch

    def state_dict(self) -> dict:
        """Position after the micro-batches returned so far (JSON types only)."""
        return {"format": STATE_FORMAT, "version": STATE_VERSION, "fingerprint": self._fingerprint(),
                "stream": json.loads(json.dumps(self._consumed))}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict() of a loader with the same data config (any dp_size)."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError("not a data loader state (format is not %r)" % STATE_FORMAT)
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r} is not {STATE_VERSION}")
        mine, saved = self._fingerprint(), state["fingerprint"]
        diff = sorted(k for k in set(mine) | set(saved) if mine.get(k) != saved.get(k))
        if diff:
            raise ValueError(
                f"the data loader state was saved with a different data config ({', '.join(diff)} differ: "
                f"saved {[saved.get(k) for k in diff]}, now {[mine.get(k) for k in diff]})"
            )
        self.close()
        stream = self._new_stream()
        stream.load_state(state["stream"])
        self._stream = stream
        self._consumed = stream.state()
        self._gen = None

    def close(self) -> None:
        """Stop the prefetch thread. Iterating again continues from state_dict()'s position."""
        if self._prefetch is not None:
            self._finalizer()
            self._prefetch = None
            # the thread read ahead: rewind the stream to what was handed out
            self._stream = self._new_stream()
            self._stream.load_state(json.loads(json.dumps(self._consumed)))
        self._gen = None


class ValidLoader(_Base):
    """One deterministic pass over the validation data; every iter() starts again.

    The validation split of each training dataset (or the valid_datasets) in order, packed like
    training data, sequence j on rank j mod dp_size. The last sequence is padded (loss_mask 0), and
    rows are padded so every rank yields the same number of micro-batches (collectives stay in step).
    """

    def __init__(self, cfg: DataConfig, dp_rank: int, dp_size: int):
        super().__init__(cfg, dp_rank, dp_size)
        if not self.valid_sets and cfg.validation_fraction == 0:
            raise ValueError("no validation data: set validation_fraction > 0 or valid_datasets")

    def _packers(self):
        c = self.cfg
        if self.valid_sets:
            parts = [(ds, i, range(len(ds.shards)), None, c.valid_datasets[i]) for i, ds in enumerate(self.valid_sets)]
        else:
            parts = [(ds, i, *self._split(i, validation=True), c.datasets[i]) for i, ds in enumerate(self.train_sets)]
        for ds, i, ids, keep, spec in parts:
            src = DocSource(ds, i, c.seed, shard_ids=ids, keep=keep, interleave=1, shuffle=False, loop=False,
                            skip_bad_shards=c.skip_bad_shards, split="validation",
                            transform=document_transform(spec, training=False))
            yield Packer(src, c.seq_len + 1, c.packing)

    def __iter__(self):
        B, dp, me = self.cfg.micro_batch, self.dp_size, self.dp_rank
        pad = self.eod_id or 0
        packers = self._packers()
        packer = next(packers, None)

        def next_sequence(materialize):
            nonlocal packer
            while packer is not None:
                item = packer.next(materialize)
                if item is not None:
                    return item
                packer = next(packers, None)
            return None

        produced = False
        while True:
            rows, got = [], 0
            for _ in range(B):
                for q in range(dp):
                    item = next_sequence(q == me)
                    got += item is not None
                    if q == me:
                        rows.append(item)
            if got == 0:
                if not produced:
                    raise ValueError(
                        "the validation data is empty (no held-out document long enough for one sequence): "
                        "raise validation_fraction or give valid_datasets"
                    )
                return
            produced = True
            yield make_batch(rows, self.cfg.seq_len, self.cfg.reset_at_doc_boundary, pad)


def build_train_loader(cfg: DataConfig, dp_rank: int = 0, dp_size: int = 1) -> TrainLoader:
    """Endless training micro-batches for one DP rank (all TP/PP/CP ranks of a replica pass the
    same dp_rank). Reads manifests and checks local shards exist now, before any training."""
    return TrainLoader(cfg, dp_rank, dp_size)


def build_valid_loader(cfg: DataConfig, dp_rank: int = 0, dp_size: int = 1) -> ValidLoader:
    """A re-iterable, finite validation loader for one DP rank."""
    return ValidLoader(cfg, dp_rank, dp_size)
