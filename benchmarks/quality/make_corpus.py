"""The quality run's corpus: English text found on this machine, as byte-token shards.

    python benchmarks/quality/make_corpus.py                  # -> data/quality/{train,valid}
    python benchmarks/quality/make_corpus.py --budget-mb 0.5 --out /tmp/q   # a tiny one (tests)

Three sources, each filled up to its share of the byte budget (a source that runs short leaves
the rest to the ones after it) (default 18 MB of text: the
shards store byte tokens as uint16, so about 37 MB, inside what a device call carries):
  doc        /usr/share/doc: README/NEWS/HISTORY/copyright files and .md/.txt/.rst (gzipped ones
             unpacked), changelogs left out (mostly version stamps)
  man        /usr/share/man/man{1,5,7,8}: man pages with their roff markup stripped (here, in
             Python: the text does not depend on the installed groff)
  docstrings the Python standard library's module/class/function docstrings (tests left out)
Within a source, documents are taken in the order of a hash of their names, so the budget
samples the source evenly; identical texts are kept once; a document is cut at 64 KB (at a line
end). A hash of each document's name puts it in the validation set (`--valid-fraction`, whole
documents), so no validation text is trained on. The output depends only on this machine's files
and the options: rebuilt, the shards are byte-identical (tools/make_shards.py), and a rebuild of
an unchanged corpus does nothing. `corpus.json` beside the shards records what went in.

The intermediate jsonl files go to `<out>_src/` (not carried to the GPU machine: only `<out>`).
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import os
import re
import sys
import sysconfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

# Shares of the budget, filled in this order; what a source lacks goes to the next ones.
SHARES = {"docstrings": 0.18, "man": 0.37, "doc": 0.45}
MAX_DOC_BYTES = 64_000
MIN_DOC_BYTES = 200
DOC_NAMES = ("readme", "news", "history", "changes", "copyright", "authors", "thanks", "todo", "faq",
             "bugs", "install", "usage")
DOC_SUFFIXES = (".md", ".txt", ".rst")
MAN_SECTIONS = ("man1", "man5", "man7", "man8")


def unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") / 2.0**64


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            data = f.read()
        if path.endswith(".gz"):
            data = gzip.decompress(data)
        return data.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile):
        return None


def _walk(root: str):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            p = os.path.join(dirpath, f)
            if not os.path.islink(p) and os.path.isfile(p):
                yield p


# ------------------------------------------------------------------ sources: name -> text

def doc_files(root="/usr/share/doc") -> list[str]:
    out = []
    for p in _walk(root):
        name = os.path.basename(p).lower()
        if name.endswith(".gz"):
            name = name[:-3]
        if name.startswith("changelog"):
            continue
        if name.endswith(DOC_SUFFIXES) or name.split(".")[0] in DOC_NAMES:
            out.append(p)
    return out


_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),     # font changes
    (re.compile(r"\\s[+-]?\d+"), ""),                  # size changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),     # strings
    (re.compile(r"\\\((em|hy)"), "--"),
    (re.compile(r"\\\((en|mi)"), "-"),
    (re.compile(r"\\\((aq|cq|oq)"), "'"),
    (re.compile(r"\\\((dq|lq|rq)"), '"'),
    (re.compile(r"\\\(co"), "(c)"),
    (re.compile(r"\\\(bu"), "*"),
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),         # other special characters
    (re.compile(r"\\[-]"), "-"),
    (re.compile(r"\\e"), "\\\\"),
    (re.compile(r"\\[&|^%cd u]"), lambda m: " " if m.group(0) == "\\ " else ""),
]
_TEXT_MACROS = {"B", "I", "SM", "SB", "BR", "RB", "IR", "RI", "BI", "IB", "IP", "TQ", "UR", "MT", "OP"}
_BREAK_MACROS = {"PP", "LP", "P", "TP", "sp", "br", "HP", "RS", "RE", "PD", "in", "ti", "nf", "fi", "ne"}


def _unescape(s: str) -> str:
    for pat, rep in _ESCAPES:
        s = pat.sub(rep, s)
    return s


def roff_to_text(src: str) -> str:
    """A man page's roff source -> plain text (headings, paragraphs, macro arguments)."""
    out: list[str] = []
    for line in src.split("\n"):
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        if line.startswith((".", "'")):
            m = re.match(r"[.'\s]*(\S+)\s*(.*)", line)
            if not m:
                continue
            macro, args = m.group(1), m.group(2)
            parts = [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', args)]
            if macro in ("SH", "SS"):
                out += ["", _unescape(" ".join(parts)), ""]
            elif macro in _TEXT_MACROS:
                joiner = "" if len(macro) == 2 and macro.isupper() and macro not in ("SM", "SB", "IP", "TQ", "UR", "MT", "OP") else " "
                text = _unescape(joiner.join(parts)).strip()
                if text:
                    out.append(text)
            elif macro in _BREAK_MACROS and out and out[-1] != "":
                out.append("")
            continue
        out.append(_unescape(line))
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def man_files(root="/usr/share/man") -> list[str]:
    return [p for s in MAN_SECTIONS if os.path.isdir(os.path.join(root, s))
            for p in _walk(os.path.join(root, s))]


def docstring_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "lib2to3"}
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    return out


def docstrings_text(src: str, module: str) -> str | None:
    try:
        tree = ast.parse(src)
    except (SyntaxError, ValueError):
        return None
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"Module {module}\n\n{doc}")

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                d = ast.get_docstring(child)
                if d:
                    kind = "class" if isinstance(child, ast.ClassDef) else "def"
                    parts.append(f"{kind} {name}\n\n{d}")
                visit(child, name + ".")

    visit(tree, module + ".")
    return "\n\n".join(parts) if parts else None


def _cut(text: str) -> str:
    text = text.strip()
    if len(text.encode("utf-8")) <= MAX_DOC_BYTES:
        return text
    cut = text.encode("utf-8")[:MAX_DOC_BYTES].decode("utf-8", errors="ignore")
    return cut[: cut.rfind("\n")] if "\n" in cut else cut


def collect(source: str, budget: int, seen: set) -> list[tuple[str, str]]:
    """[(name, text)] of one source up to `budget` UTF-8 bytes, in name-hash order."""
    if source == "doc":
        files, read = doc_files(), _read
    elif source == "man":
        files, read = man_files(), (lambda p: (lambda s: roff_to_text(s) if s else None)(_read(p)))
    else:
        root = sysconfig.get_paths()["stdlib"]

        def read(p):
            s = _read(p)
            mod = os.path.relpath(p, root)[:-3].replace(os.sep, ".").removesuffix(".__init__")
            return docstrings_text(s, mod) if s else None
        files = docstring_files()
        names = {p: "stdlib/" + os.path.relpath(p, root) for p in files}
    out, used = [], 0
    for p in sorted(files, key=lambda p: unit_hash(f"{source}:{p}")):
        if used >= budget:
            break
        text = read(p)
        if not text:
            continue
        text = _cut(text)
        n = len(text.encode("utf-8"))
        h = hashlib.sha256(text.encode()).digest()
        if n < MIN_DOC_BYTES or h in seen:
            continue
        seen.add(h)
        name = names[p] if source == "docstrings" else p
        out.append((f"{source}:{name}", text))
        used += n
    return out


def build(out: str, budget_mb: float, valid_fraction: float, shard_size_mb: float, quiet: bool) -> dict:
    from mdn_scale.data.make_shards import make_shards

    budget = int(budget_mb * 1e6)
    seen: set = set()
    docs = []
    per_source = {}
    left, share_left = budget, 1.0
    for source, share in SHARES.items():
        got = collect(source, int(left * share / share_left), seen)
        n = sum(len(t.encode()) for _, t in got)
        per_source[source] = {"documents": len(got), "bytes": n}
        docs += got
        left, share_left = left - n, share_left - share
    docs.sort(key=lambda d: unit_hash("order:" + d[0]))
    split = {"train": [], "valid": []}
    for name, text in docs:
        split["valid" if unit_hash("valid:" + name) < valid_fraction else "train"].append((name, text))
    src = out.rstrip("/") + "_src"
    os.makedirs(src, exist_ok=True)
    summary = {"sources": per_source, "budget_bytes": budget, "valid_fraction": valid_fraction,
               "max_doc_bytes": MAX_DOC_BYTES, "min_doc_bytes": MIN_DOC_BYTES,
               "python_stdlib": sysconfig.get_paths()["stdlib"], "splits": {}}
    for part, items in split.items():
        path = os.path.join(src, f"{part}.jsonl")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for name, text in items:
                f.write(json.dumps({"name": name, "text": text}, ensure_ascii=False) + "\n")
        if not (os.path.exists(path) and open(path, "rb").read() == open(tmp, "rb").read()):
            os.replace(tmp, path)  # unchanged text keeps its mtime; make_shards hashes contents anyway
        else:
            os.remove(tmp)
        try:  # the same corpus again: nothing to do; another one: replace the old shards
            manifest = make_shards([path], os.path.join(out, part), shard_size_mb=shard_size_mb, progress=not quiet)
        except ValueError as e:
            if "holds a different build" not in str(e):
                raise
            manifest = make_shards([path], os.path.join(out, part), shard_size_mb=shard_size_mb,
                                   overwrite=True, progress=not quiet)
        with open(manifest) as f:
            m = json.load(f)
        summary["splits"][part] = {"documents": m["documents"], "tokens": m["tokens"],
                                   "shards": len(m["shards"]), "shard_bytes": sum(s["bytes"] for s in m["shards"]),
                                   "text_sha256": hashlib.sha256(open(path, "rb").read()).hexdigest()}
    with open(os.path.join(out, "corpus.json"), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
        f.write("\n")
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(REPO, "data", "quality"))
    ap.add_argument("--budget-mb", type=float, default=18.0, help="MB of text over all sources")
    ap.add_argument("--valid-fraction", type=float, default=0.03, help="share of documents held out")
    ap.add_argument("--shard-size-mb", type=float, default=4.0)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    s = build(a.out, a.budget_mb, a.valid_fraction, a.shard_size_mb, a.quiet)
    print(json.dumps(s, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
