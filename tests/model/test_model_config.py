"""ModelConfig validation, the shipped YAML configs, and model_stats' parameter counts."""
import glob
import os

import pytest
import yaml

from model_dist import run_ranks
from mdn_scale.model import ModelConfig, check_parallel, to_transformer_config
from mdn_scale.model.stats import model_stats

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("field, value", [
    ("mixer", "mamba"), ("hidden_size", 0), ("num_layers", -1), ("num_heads", 2.5),
    ("head_k_dim", True), ("expand_v", 0), ("vocab_size", 0), ("conv_size", 0),
    ("min_log_mu", 0.5), ("min_log_mu", float("-inf")), ("tau_factor", 0), ("mlp_ratio", -1),
    ("attention_every", -1), ("norm_eps", 0), ("init_std", float("inf")), ("seq_len", 0),
    ("backend", "cuda"), ("ffn_hidden_size", 0), ("chunk_size", 48),
])
def test_bad_field_names_itself(field, value):
    with pytest.raises(ValueError, match=f"model.{field}"):
        ModelConfig(**{field: value})


def test_attention_heads_must_divide_hidden():
    with pytest.raises(ValueError, match="num_attention_heads"):
        ModelConfig(hidden_size=96, attention_every=2, num_attention_heads=5)
    with pytest.raises(ValueError, match="attention_every"):
        ModelConfig(mixer="transformer", attention_every=3)


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="hidden_dim"):
        ModelConfig.from_dict({"hidden_dim": 3})


def test_parallel_errors():
    cfg = ModelConfig(num_heads=6)
    with pytest.raises(ValueError, match="num_heads=6 is not divisible by parallel.tensor=4"):
        check_parallel(cfg, tensor_parallel=4)
    with pytest.raises(ValueError, match="parallel.pipeline"):
        check_parallel(cfg, pipeline_parallel=0)
    with pytest.raises(ValueError, match="num_layers"):
        check_parallel(ModelConfig(num_layers=2), pipeline_parallel=4)
    with pytest.raises(ValueError, match="num_attention_heads"):
        check_parallel(ModelConfig(attention_every=2, num_attention_heads=3, hidden_size=96,
                                   num_heads=4), tensor_parallel=2)
    with pytest.raises(ValueError, match="sequence_parallel"):
        to_transformer_config(cfg, sequence_parallel=True)


def test_layer_pattern():
    assert ModelConfig(num_layers=8, attention_every=4, num_attention_heads=8).layer_types() == \
        ["mdn"] * 3 + ["attention"] + ["mdn"] * 3 + ["attention"]
    assert ModelConfig(mixer="gdn", num_layers=2).layer_types() == ["gdn", "gdn"]


def test_shipped_configs_load():
    files = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
    names = {os.path.basename(f) for f in files}
    assert {"tiny.yaml", "mdn_400m.yaml", "mdn_1.3b.yaml", "mdn_400m_hybrid_3to1.yaml",
            "mdn_400m_hybrid_7to1.yaml"} <= names
    for f in files:
        with open(f) as fh:
            cfg = ModelConfig(**yaml.safe_load(fh)["model"])
        check_parallel(cfg, tensor_parallel=2)
    with open(os.path.join(ROOT, "configs", "mdn_400m.yaml")) as fh:
        s = model_stats(ModelConfig(**yaml.safe_load(fh)["model"]))
    assert 390e6 < s["params_total"] < 430e6  # "400M"


def count_worker(rank, world, cfgs):
    from model_workers import init_parallel, make_model

    from mdn_scale.model.mixer import unpadded_numel
    init_parallel()
    models = [make_model(c) for c in cfgs]
    return ([sum(p.numel() for p in m.parameters()) for m in models],
            [sum(unpadded_numel(p) for p in m.parameters()) for m in models])


def test_stats_count_matches_built_model():
    """The stats count the model's parameters without the in-projection's alignment rows (zero,
    not in checkpoints): the GDN mode here has 102 rows per layer and 2 of them (2 · 32 per
    layer, 4 recurrent layers); a hybrid stack has them in its 2 recurrent layers."""
    base = dict(hidden_size=32, num_layers=4, num_heads=2, head_k_dim=8, vocab_size=61,
                vocab_pad_multiple=8, seq_len=64, mlp_ratio=2)
    cfgs = [dict(base), dict(base, mixer="gdn"),
            dict(base, attention_every=2, num_attention_heads=4),
            dict(base, mixer="transformer", num_attention_heads=4),
            dict(base, mixer="gdn", attention_every=2, num_attention_heads=4),
            dict(base, mixer="gdn", in_proj_row_multiple=1)]
    built, unpadded = run_ranks(count_worker, 1, cfgs)[0]
    stats = [model_stats(ModelConfig(**c))["params_total"] for c in cfgs]
    assert unpadded == stats
    assert [b - s for b, s in zip(built, stats)] == [0, 4 * 2 * 32, 0, 0, 2 * 2 * 32, 0]


def test_unaligned_in_projection_rows_are_reported(caplog):
    """A rank's fused in-projection with a row count that is not a multiple of 8 makes cuBLAS
    run slower kernels on Hopper (BENCHMARKS.md: the GDN mode at 1.3B, 9234 rows): by default
    the mixer pads them to a multiple of 8; with model.in_proj_row_multiple: 1 it logs it once
    per row count. The 1.3B config: MDN aligned at TP = 1 (9240 rows), not at
    TP = 2 (4620); the GDN mode not at TP = 1 (9234)."""
    import logging

    from mdn_scale.model import mixer as mixer_mod

    mdn = ModelConfig(hidden_size=2048, num_layers=2, num_heads=6, head_k_dim=256, expand_v=2,
                      vocab_size=300)
    gdn = ModelConfig(hidden_size=2048, num_layers=2, num_heads=6, head_k_dim=256, expand_v=2,
                      vocab_size=300, mixer="gdn")
    rows = {name: sum(n for _, n in mixer_mod.in_proj_parts(c, h))
            for name, c, h in (("mdn", mdn, 6), ("mdn_tp2", mdn, 3), ("gdn", gdn, 6))}
    assert rows == {"mdn": 9240, "mdn_tp2": 4620, "gdn": 9234}
    # what the mixer builds (model.in_proj_row_multiple: 8, the default): zero rows up to 8
    pads = {name: dict(mixer_mod.local_in_proj_parts(c, h)).get("pad", 0)
            for name, c, h in (("mdn", mdn, 6), ("mdn_tp2", mdn, 3), ("gdn", gdn, 6))}
    assert pads == {"mdn": 0, "mdn_tp2": 4, "gdn": 6}
    off = ModelConfig(**{**gdn.to_dict(), "in_proj_row_multiple": 1})
    assert mixer_mod.local_in_proj_parts(off, 6) == mixer_mod.in_proj_parts(off, 6)
    mixer_mod._WARNED_ROWS.clear()
    with caplog.at_level(logging.WARNING, logger="mdn_scale.model"):
        for name, c, h in (("mdn", mdn, 6), ("gdn", gdn, 6), ("gdn", gdn, 6), ("mdn_tp2", mdn, 3)):
            mixer_mod._warn_unaligned_rows(rows[name], h, c)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2, msgs   # the GDN mode once, MDN at TP = 2 once, aligned MDN never
    assert "9234 rows" in msgs[0] and "'gdn'" in msgs[0] and "4620 rows" in msgs[1]
