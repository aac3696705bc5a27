"""ours → HF → ours is exact; the exported HF model (AutoModelForCausalLM, trust_remote_code)
gives our logits, both with the token-loop recurrence and the chunkwise prefill; generate's
recurrent decoding agrees with full-sequence forward passes."""
import os

import pytest
import torch

from model_dist import run_ranks

transformers = pytest.importorskip("transformers", reason="needs the optional extra [hf] (transformers)")

from mdn_scale.model import ModelConfig  # noqa: E402
from mdn_scale.model.convert import export_hf, hf_to_canonical, import_hf, load_tensors  # noqa: E402

BASE = dict(hidden_size=32, num_layers=4, num_heads=2, head_k_dim=8, vocab_size=61,
            vocab_pad_multiple=8, seq_len=64, ffn_hidden_size=64, chunk_size=8, min_log_mu=-1.0)
CASES = {"mdn": BASE, "gdn": dict(BASE, mixer="gdn"),
         "hybrid": dict(BASE, attention_every=2, num_attention_heads=2),
         "transformer": dict(BASE, mixer="transformer", num_attention_heads=4)}


def ours_worker(rank, world, cases, ids):
    from mdn_scale.model.sharding import gather_full_state_dict
    from model_workers import init_parallel, make_model
    init_parallel()
    out = {}
    for name, cfg in cases.items():
        m = make_model(cfg)
        with torch.no_grad():
            out[name] = (gather_full_state_dict(m), m(ids, None, None))
    return out


@pytest.fixture(scope="module")
def ours():
    ids = torch.randint(0, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    return ids, run_ranks(ours_worker, 1, CASES, ids)[0]


@pytest.mark.parametrize("name", list(CASES))
def test_roundtrip_and_hf_logits(name, ours, tmp_path):
    ids, res = ours
    full, logits = res[name]
    cfg = ModelConfig(**CASES[name])
    out = tmp_path / name
    export_hf(full, cfg, str(out))
    cfg2, back = import_hf(str(out))
    assert cfg2 == cfg
    assert set(back) == set(full)
    for k in full:
        assert torch.equal(back[k], full[k]), k

    from transformers import AutoModelForCausalLM
    for backend in ("loop", "auto"):
        hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True,
                                                  dtype=torch.float64, recurrent_backend=backend)
        hf.eval()
        assert hf.config.recurrent_backend == backend
        with torch.no_grad():
            got = hf(ids).logits
        torch.testing.assert_close(got, logits, rtol=1e-9, atol=1e-10,
                                   msg=lambda m: f"{name} backend={backend}: {m}")
    # Recurrent decoding = recomputing the whole sequence each step (greedy).
    gen = hf.generate(ids[:, :5], max_new_tokens=6)
    assert gen.shape == (2, 11)
    with torch.no_grad():
        for t in range(5, 11):
            full_logits = hf(gen[:, :t]).logits[:, -1, :61]
            assert torch.equal(full_logits.argmax(-1), gen[:, t]), f"{name}: step {t}"


def test_import_reports_mismatches_by_name(ours, tmp_path):
    _, res = ours
    full, _ = res["mdn"]
    cfg = ModelConfig(**BASE)
    export_hf(full, cfg, str(tmp_path))
    sd = load_tensors(str(tmp_path))
    sd["model.layers.1.attn.k_proj.weight"] = torch.zeros(3, 32)
    del sd["model.layers.2.attn.A_log"]
    sd["model.layers.0.attn.bogus"] = torch.zeros(1)
    with pytest.raises(ValueError) as e:
        hf_to_canonical(sd, cfg)
    msg = str(e.value)
    assert "model.layers.1.attn.k_proj.weight: shape (3, 32)" in msg
    assert "missing model.layers.2.attn.A_log" in msg
    assert "unexpected model.layers.0.attn.bogus" in msg
    torch.save({"x": torch.zeros(1)}, tmp_path / "w.bin")
    assert set(load_tensors(str(tmp_path / "w.bin"))) == {"x"}


def test_cli_roundtrip_via_dcp(ours, tmp_path):
    """The tool: a torch.distributed.checkpoint directory (keys under 'model.') -> HF -> a
    canonical safetensors file + model YAML, equal to the source."""
    import subprocess
    import sys

    import torch.distributed.checkpoint as dcp
    import yaml
    from safetensors.torch import load_file

    _, res = ours
    full, _ = res["hybrid"]
    dcp.save({"model": {k: v.clone() for k, v in full.items()}}, checkpoint_id=str(tmp_path / "dcp"))
    with open(tmp_path / "m.yaml", "w") as f:
        yaml.safe_dump({"model": CASES["hybrid"]}, f)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tool = os.path.join(root, "tools", "convert_checkpoint.py")
    run = lambda *a: subprocess.run([sys.executable, tool, *a], capture_output=True, text=True)  # noqa: E731
    r = run("to-hf", "--config", str(tmp_path / "m.yaml"), "--weights", str(tmp_path / "dcp"),
            "--prefix", "model.", "--out", str(tmp_path / "hf"))
    assert r.returncode == 0, r.stderr
    r = run("from-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back.safetensors"),
            "--config-out", str(tmp_path / "back.yaml"))
    assert r.returncode == 0, r.stderr
    back = load_file(str(tmp_path / "back.safetensors"))
    assert set(back) == set(full) and all(torch.equal(back[k], full[k]) for k in full)
    with open(tmp_path / "back.yaml") as f:
        assert ModelConfig(**yaml.safe_load(f)["model"]) == ModelConfig(**CASES["hybrid"])
    bad = run("to-hf", "--config", str(tmp_path / "back.yaml"), "--weights",
              str(tmp_path / "back.safetensors"), "--out", str(tmp_path / "x"), "--prefix", "nope.")
    assert bad.returncode != 0 and "no tensors under prefix 'nope.'" in bad.stderr
