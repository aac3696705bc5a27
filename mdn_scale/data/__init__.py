"""Data: tokenized webdataset shards, packing, DP/CP splitting, exact resume.

Making shards (also `python tools/make_shards.py --help`)::

    make_shards(sources=None, output=None, *, tokenizer=None, eod_token=None, field="text",
                input_format="auto", text_split="file", shard_size_mb=None,
                max_docs_per_shard=100_000, on_decode_error="raise", overwrite=False,
                progress=True) -> manifest path
    # sources None: the Python standard library's *.py files -> DEFAULT_SHARDS_DIR ("data/stdlib"),
    # byte tokenizer (ids 0..255 = UTF-8 bytes, 256 = end of document, vocab_size 257).
    load_manifest_tokenizer(manifest_path) -> tokenizer with .encode(text) / .decode(ids)

Reading::

    cfg = DataConfig(datasets=["data/stdlib"], seq_len=512, micro_batch=4, seed=1234,
                     validation_fraction=0.01)
    train = build_train_loader(cfg, dp_rank, dp_size)   # endless iterator of micro-batches
    batch = next(train)            # tokens, labels [B, T] int64; loss_mask [B, T] float32;
                                   # cu_seqlens [N+1] int32 over the flattened B·T stream
    local = cp_slice(batch, cp_rank, cp_size)   # [1, B·T/cp_size] pieces, cu_seqlens global
    sd = train.state_dict()        # same on every rank at a step boundary; JSON types only
    train.load_state_dict(sd)      # any dp_size / micro_batch: continues exactly
    train.close()                  # stops the prefetch thread; iterating again continues
    for batch in build_valid_loader(cfg, dp_rank, dp_size): ...   # finite, re-iterable,
                                   # the same number of micro-batches on every rank
    train.vocab_size, train.eod_id, train.tokenizer   # from the manifests (None without one)
    DataConfig.from_dict(mapping, where="data")       # unknown keys -> ValueError naming them

A corrupt, truncated or missing shard raises ShardError (a ValueError; `.shard` names it), or
with `skip_bad_shards=True` is skipped with a warning on the "mdn_scale.data" logger.

Global sequence j goes to DP rank j mod dp_size, so a global batch holds the same sequences
under any layout (each rank reads all the token data to get there; its share is kept). Every TP/PP/CP rank of one replica builds its loader with the replica's
dp_rank and gets the same batches. Details: loader.py (batches, splitting, resume), stream.py
(order, packing), format.py (the shard format and manifest), config.py (every option).
"""

from .config import DataConfig, DatasetSpec
from .format import ShardError
from .loader import TrainLoader, ValidLoader, build_train_loader, build_valid_loader, cp_slice
from .make_shards import DEFAULT_SHARDS_DIR, load_manifest_tokenizer, make_shards
from .tokenizer import BYTE_EOD_ID, BYTE_VOCAB_SIZE

__all__ = [
    "DataConfig", "DatasetSpec", "ShardError", "TrainLoader", "ValidLoader", "build_train_loader",
    "build_valid_loader", "cp_slice", "DEFAULT_SHARDS_DIR", "load_manifest_tokenizer", "make_shards",
    "BYTE_EOD_ID", "BYTE_VOCAB_SIZE",
]
