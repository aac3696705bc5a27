"""Long-context data: document-length filters, up-sampling of long documents, whole-document packing.

Each piece is a pure function of a shard's document list (or of a packer's position), applied
where the shard is read (stream.DocSource._load) or where a sequence is cut (stream.Packer), so the
loader's state — shard cursors and offsets into the current document — still pins the stream
exactly: resume is as exact as without them.

Per dataset (DatasetSpec):
    min_doc_tokens / max_doc_tokens: keep only documents with that many tokens (the stored
        tokens, end-of-document id included); max 0 = no upper bound. Applies to training and to
        the held-out validation part of the dataset.
    upsample_min_tokens / upsample_factor: in training, every kept document of at least
        upsample_min_tokens tokens is read upsample_factor times per epoch (copies shuffled with the
        rest of its shard). Together with the mixture weights this sets the share of long documents.
Per run (DataConfig.packing):
    "concat": documents are concatenated and cut every T+1 tokens (no padding; a document may
        start near a sequence's end and continue in the next one).
    "keep_whole": a document that does not fit in what is left of the current sequence starts the
        next one (the rest is padding, masked out of the loss), so every document of at most T+1
        tokens lies whole in one sequence and a longer one is cut only at sequence starts (into
        the fewest pieces). The MDN state still restarts at each document start (cu_seqlens).
"""

from __future__ import annotations

PACKINGS = ("concat", "keep_whole")


def length_filter(docs: list, min_tokens: int = 0, max_tokens: int = 0) -> list:
    """The documents with min_tokens <= len <= max_tokens (max_tokens 0: no upper bound)."""
    return [d for d in docs if len(d) >= min_tokens and (max_tokens == 0 or len(d) <= max_tokens)]


def upsample_long(docs: list, min_tokens: int, factor: int) -> list:
    """Each document of at least min_tokens tokens repeated `factor` times (next to each other;
    the caller's shuffle spreads them). factor 1 or min_tokens 0 with factor 1: unchanged."""
    if factor == 1:
        return list(docs)
    out = []
    for d in docs:
        out.extend([d] * (factor if len(d) >= min_tokens else 1))
    return out


def document_transform(spec, training: bool):
    """The shard-level transform of one DatasetSpec (None when it changes nothing)."""
    lo, hi = spec.min_doc_tokens, spec.max_doc_tokens
    up = training and spec.upsample_factor > 1
    if lo == 0 and hi == 0 and not up:
        return None

    def transform(docs: list) -> list:
        docs = length_filter(docs, lo, hi)
        return upsample_long(docs, spec.upsample_min_tokens, spec.upsample_factor) if up else docs

    return transform


def starts_next_sequence(doc_len: int, filled: int, length: int) -> bool:
    """keep_whole: does a document of doc_len tokens, about to be placed at position `filled` of
    a sequence of `length`, move to the next sequence instead? Only when it would not fit in the
    rest but would fit better from a sequence start: not when the sequence is still empty."""
    return filled > 0 and filled + doc_len > length


def spec_fingerprint(spec) -> dict:
    """The long-document options of a DatasetSpec that change the stream (defaults left out, so
    a loader state saved before these options existed still loads)."""
    out = {}
    for name, default in (("min_doc_tokens", 0), ("max_doc_tokens", 0),
                          ("upsample_min_tokens", 0), ("upsample_factor", 1)):
        v = getattr(spec, name)
        if v != default:
            out[name] = v
    return out
