"""The quality run's pieces on CPU: the corpus maker (synthetic sources), the plot tool
(synthetic run folders) and suite plan q's commands."""
import gzip
import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import yaml

from tool_loader import load_tool

ROOT = Path(__file__).resolve().parents[2]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def corpus():
    return _load(ROOT / "benchmarks" / "quality" / "make_corpus.py", "make_corpus")


def test_roff_to_text(corpus):
    src = "\n".join([
        '.\\" a comment', ".TH LS 1", ".SH NAME", "ls \\- list directory contents", ".SH DESCRIPTION",
        "List information about the \\fIFILE\\fRs.", ".PP", ".BR mprotect (2)", ".B \\-a",
        "do not ignore entries starting with \\(aq.\\(aq",
    ])
    assert corpus.roff_to_text(src) == (
        "NAME\n\nls - list directory contents\n\nDESCRIPTION\n\nList information about the FILEs.\n\n"
        "mprotect(2)\n-a\ndo not ignore entries starting with '.'")


def _fake_sources(tmp_path, corpus, monkeypatch):
    doc, man = tmp_path / "doc", tmp_path / "man"
    doc.mkdir()
    man.mkdir()
    words = "the quick brown fox jumps over the lazy dog while memory keys protect pages".split()
    for i in range(24):
        text = "\n".join(" ".join(words[(i + j) % len(words):] + words[:(i + j) % len(words)]) + f" {i} {j}"
                         for j in range(12))
        (doc / f"README{i}.md").write_text(text)
        with gzip.open(man / f"tool{i}.1.gz", "wt") as f:
            f.write(f".SH NAME\ntool{i} \\- does {i}\n.SH DESCRIPTION\n{text}\n")
    (doc / "copy.md").write_text((doc / "README0.md").read_text())  # a duplicate: kept once
    (doc / "changelog.Debian").write_text("x" * 1000)                # left out
    real_doc_files = corpus.doc_files
    monkeypatch.setattr(corpus, "doc_files", lambda: real_doc_files(str(doc)))
    monkeypatch.setattr(corpus, "man_files", lambda: sorted(str(p) for p in man.iterdir()))
    monkeypatch.setattr(corpus, "docstring_files", lambda: [os.path.join(os.path.dirname(json.__file__), "decoder.py")])


def test_make_corpus_deterministic_and_held_out(tmp_path, corpus, monkeypatch):
    _fake_sources(tmp_path, corpus, monkeypatch)
    outs = []
    for k in ("a", "b"):
        out = tmp_path / k / "q"
        s = corpus.build(str(out), budget_mb=0.02, valid_fraction=0.3, shard_size_mb=0.01, quiet=True)
        outs.append((out, s))
    (a, sa), (b, sb) = outs
    assert sa["sources"] == sb["sources"] and sa["sources"]["man"]["documents"] > 0
    assert sa["sources"]["docstrings"]["documents"] == 1
    for part in ("train", "valid"):
        fa = sorted(p.name for p in (a / part).glob("shard-*.tar"))
        assert fa and fa == sorted(p.name for p in (b / part).glob("shard-*.tar"))
        for name in fa:
            assert (a / part / name).read_bytes() == (b / part / name).read_bytes()
    names = {part: [json.loads(line)["name"] for line in open(f"{a}_src/{part}.jsonl")] for part in ("train", "valid")}
    assert names["train"] and names["valid"] and not set(names["train"]) & set(names["valid"])
    texts = [json.loads(line)["text"] for p in ("train", "valid") for line in open(f"{a}_src/{p}.jsonl")]
    assert len(texts) == len(set(texts)) and not any(n.endswith("changelog.Debian") for n in names["train"])
    assert sa["splits"]["train"]["tokens"] == sum(len(t.encode()) + 1 for t in texts) - sa["splits"]["valid"]["tokens"]
    # a rebuild of the same corpus leaves the shards alone
    mtime = (a / "train" / "manifest.json").stat().st_mtime_ns
    corpus.build(str(a), budget_mb=0.02, valid_fraction=0.3, shard_size_mb=0.01, quiet=True)
    assert (a / "train" / "manifest.json").stat().st_mtime_ns == mtime


def _fake_run(d: Path, mixer: str, steps_done: int, losses):
    d.mkdir(parents=True)
    model = {"mixer": mixer, "hidden_size": 64, "num_layers": 2, "vocab_size": 257, "vocab_pad_multiple": 64,
             "seq_len": 256}
    model.update({"num_attention_heads": 2} if mixer == "transformer" else {"num_heads": 2, "head_k_dim": 16})
    cfg = {"seed": 1, "train": {"steps": 40, "global_batch": 4, "seq_len": 256}, "model": model,
           "data": {"datasets": ["x"]}, "eval": {"interval": 10, "batches": 2}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    with open(d / "metrics.jsonl", "w") as f:
        for step in range(5, steps_done + 1, 5):
            f.write(json.dumps({"step": step, "loss": 5.0, "tokens": step * 1024, "tokens_per_s": 1000.0 * step,
                                "memory_gb": 1.5}) + "\n")
            if step % 10 == 0:
                f.write(json.dumps({"step": step, "val_loss": losses[step // 10 - 1], "val_ppl": 1.0}) + "\n")


def test_plot_quality(tmp_path):
    pq = load_tool("plot_quality")
    _fake_run(tmp_path / "q_mdn", "mdn", 40, [5.0, 4.5, 4.2, 4.0])
    _fake_run(tmp_path / "q_gdn", "gdn", 40, [5.1, 4.6, 4.3, 4.1])
    _fake_run(tmp_path / "q_transformer", "transformer", 25, [5.2, 4.7])  # cut short at step 25
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"jobs": [{"job": "q_mdn", "command": "torchrun ... mdn", "status": "ok",
                                           "wall_s": 12.0, "gpus": "0"}]}))
    out = tmp_path / "res" / "quality_cpu"
    runs = [str(tmp_path / n) for n in ("q_mdn", "q_gdn", "q_transformer")]
    assert pq.main(runs + ["--out", str(out), "--suite", str(suite)]) == 0
    rec = json.loads(Path(f"{out}.json").read_text())
    assert rec["same_tokens"] and rec["common_val_step"] == 20 and rec["card"] and rec["versions"]["torch"]
    mdn, gdn, tr = rec["runs"]
    assert (mdn["final_val_loss"], mdn["tokens_seen"], mdn["complete"]) == (4.0, 40 * 1024, True)
    assert (tr["final_val_loss"], tr["steps_done"], tr["complete"]) == (4.7, 25, False)
    assert mdn["command"] == "torchrun ... mdn" and mdn["wall_s"] == 12.0 and "command" not in gdn
    assert mdn["tokens_per_s"] == 25000.0  # the median window after the first
    assert mdn["params"] > gdn["params"] > 0 and [p["tokens"] for p in mdn["val_curve"]] == [10240, 20480, 30720, 40960]
    md = Path(f"{out}.md").read_text()
    assert "Transformer (cut short)" in md and "val loss at step 20" in md and f"{4.0 / math.log(2):.3f}" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert Path(f"{out}.png").stat().st_size > 0


def test_suite_plan_q(capsys, tmp_path):
    suite = _load(ROOT / "benchmarks" / "suite.py", "suite")
    phases = suite.PLANS["q"]
    assert [p[0] for p in phases] == ["train", "plot"]
    lanes = phases[0][2]
    assert [l[0] for l in lanes] == ["0", "1", "2"]
    cmds = {job: cmd for _, jobs in lanes for job, _, cmd in jobs}
    assert set(cmds) == {"q_mdn", "q_gdn", "q_transformer"}
    for m in ("mdn", "gdn", "transformer"):
        c = cmds[f"q_{m}"]
        assert f"--config configs/quality/{m}.yaml" in c and "data/quality/train" in c and "data/quality/valid" in c
        assert (ROOT / "configs" / "quality" / f"{m}.yaml").is_file()
        assert c.replace(m, "X") == cmds["q_mdn"].replace("mdn", "X")  # the same overrides for all three
    assert sum(lim for _, lim, _ in phases) <= 570  # run_suite_gpu.sh's default budget
    suite.main(["--plan", "q", "--out", str(tmp_path), "--dry-run"])
    out = capsys.readouterr().out
    assert "q_plot" in out and "tools/plot_quality.py" in out and out.count("launch/pretrain.py") == 3


def test_quality_configs_agree():
    cfgs = {m: yaml.safe_load((ROOT / "configs" / "quality" / f"{m}.yaml").read_text()) for m in ("mdn", "gdn", "transformer")}
    for m, c in cfgs.items():
        assert {k: v for k, v in c.items() if k not in ("model", "logging")} == \
            {k: v for k, v in cfgs["mdn"].items() if k not in ("model", "logging")}, m
        for k in ("hidden_size", "vocab_size", "seq_len"):
            assert c["model"][k] == cfgs["mdn"]["model"][k]
