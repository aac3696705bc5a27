"""Text, jsonl and parquet files (or folders of them) -> tokenized webdataset shards + manifest.

`make_shards(sources, output, ...)` from Python, `python tools/make_shards.py SRC... -o DIR` from
the shell. With no sources it tokenizes the Python standard library's own source files (every
machine has them) into `DEFAULT_SHARDS_DIR`, so the demo trains with no downloads.

Documents: a text file is one document (`text_split="line"`: each non-empty line is one), a
jsonl line is one (its `field`, default "text"), a parquet row is one (column `field`; needs
pyarrow: `pip install pyarrow`). Folders are walked recursively in sorted order, taking files
ending in .txt .text .md .rst .py .jsonl .parquet (hidden files skipped). Empty documents are
skipped and counted. The output is a function of the inputs and options only: shards and the
manifest are byte-identical when rebuilt (tar members carry mtime 0).

Re-running into a folder that already holds a complete build of the same inputs and options does
nothing; a folder holding anything else of ours needs `overwrite=True`. The manifest is written
last (atomically), so a folder without one holds no complete build.
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import hashlib
import json
import os
import shutil
import sys
import sysconfig

import numpy as np

from .format import FORMAT, FORMAT_VERSION, MANIFEST_NAME, read_manifest, token_field_for, write_json_atomic
from .tokenizer import load_tokenizer, token_dtype

DEFAULT_SHARDS_DIR = os.path.join("data", "stdlib")
SHARD_PATTERN = "shard-%06d.tar"
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")
FOLDER_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")
INPUT_FORMATS = ("auto", "text", "jsonl", "parquet")
TEXT_SPLITS = ("file", "line")
_ENCODE_BATCH = 256


def stdlib_files() -> tuple[str, list[str]]:
    """(stdlib root, sorted *.py files under it), installed packages (site-packages) excluded."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        files += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    return root, sorted(files, key=lambda p: os.path.relpath(p, root).replace(os.sep, "/"))


def _input_kind(path: str, input_format: str) -> str:
    if input_format != "auto":
        return input_format
    if path.endswith(".jsonl"):
        return "jsonl"
    if path.endswith(".parquet"):
        return "parquet"
    return "text"


def list_inputs(sources: list[str], input_format: str = "auto") -> list[tuple[str, str]]:
    """Sources (files or folders) -> sorted [(file, kind)]; a missing or empty source is an error."""
    out = []
    for src in sources:
        if os.path.isdir(src):
            found = []
            for dirpath, dirnames, filenames in os.walk(src):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for f in filenames:
                    if f.startswith("."):
                        continue
                    if input_format == "auto" and not f.endswith(FOLDER_SUFFIXES):
                        continue
                    found.append(os.path.join(dirpath, f))
            found.sort(key=lambda p: os.path.relpath(p, src).replace(os.sep, "/"))
            if not found:
                raise ValueError(f"input folder {src!r} holds no {'/'.join(FOLDER_SUFFIXES)} files")
            out += [(f, _input_kind(f, input_format)) for f in found]
        elif os.path.isfile(src):
            out.append((src, _input_kind(src, input_format)))
        else:
            raise ValueError(f"input {src!r} does not exist")
    return out


def _require_pyarrow(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(
            f"input {path!r} is parquet, which needs pyarrow: pip install pyarrow "
            "(or pip install 'mdn_scale[parquet]')"
        ) from None
    return pq


def _documents(path: str, kind: str, field: str, text_split: str, on_decode_error: str, stats: dict):
    """Yield (text, input bytes consumed) for one input file; text None: nothing (a skipped file)."""
    if kind == "parquet":
        pq = _require_pyarrow(path)
        pf = pq.ParquetFile(path)
        if field not in pf.schema_arrow.names:
            raise ValueError(f"{path}: parquet has no column {field!r} (columns: {pf.schema_arrow.names})")
        size, rows = os.path.getsize(path), max(pf.metadata.num_rows, 1)
        row = 0
        for batch in pf.iter_batches(columns=[field]):
            for text in batch.column(0).to_pylist():
                row += 1
                if not isinstance(text, str):
                    raise ValueError(f"{path}: row {row}: column {field!r} is {type(text).__name__}, not a string")
                yield text, size / rows
        return
    if kind == "jsonl":
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    yield None, len(line)
                    continue
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as exn:
                    raise ValueError(f"{path}:{lineno}: not a JSON line ({exn})") from None
                text = obj.get(field) if isinstance(obj, dict) else None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{lineno}: field {field!r} is missing or not a string")
                yield text, len(line)
        return
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exn:
        if on_decode_error == "skip":
            stats["undecodable_files"] += 1
            yield None, len(data)
            return
        raise ValueError(f"{path}: not UTF-8 text ({exn})") from None
    if text_split == "file":
        yield text, len(data)
    else:
        for line in text.split("\n"):
            yield line, len(line.encode("utf-8")) + 1


def _fingerprint(files: list[tuple[str, str]], display: list[str], options: dict, tokenizer_id: dict) -> str:
    h = hashlib.sha256(json.dumps([FORMAT_VERSION, options, tokenizer_id], sort_keys=True).encode())
    for (path, kind), name in zip(files, display):
        fh = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                fh.update(block)
        h.update(json.dumps([name, kind, fh.hexdigest()]).encode())
    return h.hexdigest()


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _our_files(out: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(out), "shard-*.tar"))) + [
        p for p in (os.path.join(out, MANIFEST_NAME), os.path.join(out, "tokenizer.json")) if os.path.exists(p)
    ]


def make_shards(
    sources: list[str] | None = None,
    output: str | None = None,
    *,
    tokenizer: str | None = None,
    eod_token: str | None = None,
    field: str = "text",
    input_format: str = "auto",
    text_split: str = "file",
    shard_size_mb: float | None = None,
    max_docs_per_shard: int = 100_000,
    on_decode_error: str = "raise",
    overwrite: bool = False,
    progress: bool = True,
) -> str:
    """Tokenize `sources` into webdataset shards in `output`; returns the manifest's path.

    sources: files or folders (None or [] -> the Python standard library's *.py files, into
        `DEFAULT_SHARDS_DIR` unless `output` is given; undecodable files there are skipped).
    tokenizer: path of a HF tokenizers JSON file; None -> the byte tokenizer (vocab 257, EOD 256).
    eod_token: the HF tokenizer's end-of-document token (default: the first it has of
        <|endoftext|>, </s>, <|end_of_text|>, <eos>, [EOS]).
    field: the jsonl field / parquet column holding the text.
    input_format: "auto" (by file suffix), "text", "jsonl" or "parquet".
    text_split: "file" (a text file is one document) or "line" (each non-empty line is one).
    shard_size_mb: start a new shard past this many MB of tokens (default 64; 4 for the stdlib).
    max_docs_per_shard: start a new shard past this many documents.
    on_decode_error: "raise" (a non-UTF-8 text file is an error) or "skip" (skipped, counted).
    overwrite: replace a different earlier build in `output`.
    """
    default_source = not sources
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input_format {input_format!r} is not one of {INPUT_FORMATS}")
    if text_split not in TEXT_SPLITS:
        raise ValueError(f"text_split {text_split!r} is not one of {TEXT_SPLITS}")
    if on_decode_error not in ("raise", "skip"):
        raise ValueError(f"on_decode_error {on_decode_error!r} is not 'raise' or 'skip'")
    if not isinstance(field, str) or not field:
        raise ValueError(f"field {field!r} is not a non-empty string")
    if shard_size_mb is None:
        shard_size_mb = 4.0 if default_source else 64.0
    if not shard_size_mb > 0:
        raise ValueError(f"shard_size_mb must be > 0 (got {shard_size_mb})")
    if not isinstance(max_docs_per_shard, int) or max_docs_per_shard < 1:
        raise ValueError(f"max_docs_per_shard must be an integer >= 1 (got {max_docs_per_shard!r})")

    if default_source:
        root, paths = stdlib_files()
        files = [(p, "text") for p in paths]
        display = ["stdlib/" + os.path.relpath(p, root).replace(os.sep, "/") for p in paths]
        output = DEFAULT_SHARDS_DIR if output is None else output
        on_decode_error = "skip"
        inputs_desc = [f"python{sys.version_info.major}.{sys.version_info.minor} stdlib *.py ({root})"]
    else:
        if output is None:
            raise ValueError("output folder not given (make_shards(sources, output) / -o DIR)")
        files = list_inputs(list(sources), input_format)
        display = [p for p, _ in files]
        inputs_desc = list(sources)
    for path, kind in files:
        if kind == "parquet":
            _require_pyarrow(path)  # fail before any work
    tok = load_tokenizer(tokenizer, eod_token)
    tok_id = tok.identity()
    options = {
        "field": field, "input_format": input_format, "text_split": text_split,
        "shard_size_mb": shard_size_mb, "max_docs_per_shard": max_docs_per_shard,
        "on_decode_error": on_decode_error,
    }
    fingerprint = _fingerprint(files, display, options, tok_id)
    os.makedirs(output, exist_ok=True)
    # Several processes (e.g. every rank of a job) may ask for the same build: one builds, the
    # others wait here and then find it up to date.
    with open(os.path.join(output, ".make_shards.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build(files, display, output, tok, tok_id, fingerprint, options, inputs_desc, overwrite, progress)


def _build(files, display, output, tok, tok_id, fingerprint, options, inputs_desc, overwrite, progress) -> str:
    import webdataset as wds
    from tqdm import tqdm

    field, text_split, on_decode_error = options["field"], options["text_split"], options["on_decode_error"]
    shard_size_mb, max_docs_per_shard = options["shard_size_mb"], options["max_docs_per_shard"]
    dtype = token_dtype(tok.vocab_size)
    manifest_path = os.path.join(output, MANIFEST_NAME)
    if os.path.exists(manifest_path):
        try:
            old = read_manifest(manifest_path)
        except ValueError:
            old = None
        if old is not None and old.get("build", {}).get("fingerprint") == fingerprint and not overwrite:
            if progress:
                print(f"make_shards: {output} is up to date ({old['documents']} documents, {old['tokens']} tokens)")
            return manifest_path
    if os.path.isdir(output) and _our_files(output):
        if os.path.exists(manifest_path) and not overwrite:
            raise ValueError(f"output {output!r} holds a different build (its manifest.json): pass overwrite=True / --overwrite")
        # No manifest = an interrupted build; or overwrite asked for. Manifest goes first, so a
        # crash from here on never leaves a manifest pointing at a mix of old and new shards.
        for p in sorted(_our_files(output), key=lambda p: not p.endswith(MANIFEST_NAME)):
            os.remove(p)

    shards: list[dict] = []
    current = {"documents": 0, "tokens": 0}

    def shard_done(fname):
        shards.append({"name": os.path.basename(fname), **current})
        current.update(documents=0, tokens=0)

    stats = {"empty_documents": 0, "undecodable_files": 0}
    field_name = token_field_for(dtype)
    writer = wds.ShardWriter(
        os.path.join(output, SHARD_PATTERN), maxcount=max_docs_per_shard, maxsize=shard_size_mb * 1e6,
        post=shard_done, verbose=0, mtime=0, encoder=False,
    )
    n_docs = n_tokens = 0
    total_bytes = sum(os.path.getsize(p) for p, _ in files)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="make_shards", disable=not progress, file=sys.stderr)

    def flush(texts):
        nonlocal n_docs, n_tokens
        for ids in tok.encode_batch(texts):
            ids = np.append(ids, tok.eod_id).astype(dtype)
            writer.write({"__key__": f"{n_docs:010d}", field_name: ids.tobytes()})
            current["documents"] += 1
            current["tokens"] += len(ids)
            n_docs += 1
            n_tokens += len(ids)

    try:
        pending = []
        for path, kind in files:
            for text, nbytes in _documents(path, kind, field, text_split, on_decode_error, stats):
                bar.update(nbytes)
                if not text:
                    stats["empty_documents"] += text is not None
                    continue
                pending.append(text)
                if len(pending) >= _ENCODE_BATCH:
                    flush(pending)
                    pending = []
        flush(pending)
    finally:
        bar.close()
        writer.close()
    if n_docs == 0:
        for p in _our_files(output):
            os.remove(p)
        raise ValueError(f"inputs {inputs_desc} hold no non-empty documents")
    for s in shards:
        p = os.path.join(output, s["name"])
        s.update(bytes=os.path.getsize(p), sha256=_file_sha256(p))
    if tok.kind == "hf":
        shutil.copyfile(tok.path, os.path.join(output, "tokenizer.json"))
        tok_id = {**tok_id, "file": "tokenizer.json"}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "tokenizer": tok_id, "token_field": field_name,
        "documents": n_docs, "tokens": n_tokens, "shards": shards,
        "build": {"inputs": inputs_desc, "files": len(files), "fingerprint": fingerprint, "options": options,
                  "skipped": stats},
    }
    write_json_atomic(manifest_path, manifest)
    if progress:
        print(f"make_shards: {n_docs} documents, {n_tokens} tokens in {len(shards)} shards -> {manifest_path}")
    return manifest_path


def load_manifest_tokenizer(manifest_path: str):
    """The tokenizer a manifest's shards were made with (to decode them)."""
    m = read_manifest(manifest_path)
    t = m["tokenizer"]
    if t["kind"] == "bytes":
        return load_tokenizer(None)
    path = os.path.join(os.path.dirname(manifest_path), t.get("file", "tokenizer.json"))
    tok = load_tokenizer(path, t.get("eod_token"))
    if tok.identity()["sha256"] != t["sha256"]:
        raise ValueError(f"{path} is not the tokenizer {manifest_path} was made with (sha256 differs)")
    return tok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="make_shards",
        description="Tokenize text/jsonl/parquet files or folders into webdataset shards with a manifest. "
        "With no SOURCE: the Python standard library's *.py files into " + DEFAULT_SHARDS_DIR + ".",
    )
    p.add_argument("sources", nargs="*", metavar="SOURCE", help="files or folders (.txt .md .rst .py .jsonl .parquet)")
    p.add_argument("-o", "--output", help=f"output folder (default with no SOURCE: {DEFAULT_SHARDS_DIR})")
    p.add_argument("--tokenizer", help="HF tokenizers JSON file (default: bytes, vocab 257, end-of-document 256)")
    p.add_argument("--eod-token", help="end-of-document token of the HF tokenizer (default: <|endoftext|>, </s>, ...)")
    p.add_argument("--field", default="text", help="jsonl field / parquet column with the text (default: text)")
    p.add_argument("--format", dest="input_format", default="auto", choices=INPUT_FORMATS)
    p.add_argument("--text-split", default="file", choices=TEXT_SPLITS, help="a text file is one document, or each line is")
    p.add_argument("--shard-size-mb", type=float, default=None, help="MB of tokens per shard (default 64; 4 for the stdlib)")
    p.add_argument("--max-docs-per-shard", type=int, default=100_000)
    p.add_argument("--skip-undecodable", action="store_true", help="skip non-UTF-8 text files instead of failing")
    p.add_argument("--overwrite", action="store_true", help="replace a different earlier build in the output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    a = p.parse_args(argv)
    try:
        make_shards(
            a.sources, a.output, tokenizer=a.tokenizer, eod_token=a.eod_token, field=a.field,
            input_format=a.input_format, text_split=a.text_split, shard_size_mb=a.shard_size_mb,
            max_docs_per_shard=a.max_docs_per_shard, on_decode_error="skip" if a.skip_undecodable else "raise",
            overwrite=a.overwrite, progress=not a.quiet,
        )
    except ValueError as exn:
        print(f"make_shards: error: {exn}", file=sys.stderr)
        return 2
    return 0
