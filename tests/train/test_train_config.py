"""Config errors stop the run before any work, with a message naming the key."""

import os
import subprocess
import sys

import pytest

from mdn_scale.train.config import ConfigError, load_config, validate
from mdn_scale.train.demo_data import check_data

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def err(overrides, world=1, has_cuda=False, path=TINY):
    with pytest.raises(ConfigError) as e:
        cfg = load_config(path, overrides)
        validate(cfg, world, has_cuda=has_cuda)
        check_data(cfg)
    return str(e.value)


def test_demo_config_is_valid_and_overrides_are_typed():
    cfg = load_config(TINY, ["train.steps=7", "train.lr=1e-3", "parallel.tensor=2",
                             "checkpoint.dir=null", "checkpoint.interval=0"])
    assert cfg.train.steps == 7 and cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.parallel.tensor == 2 and cfg.checkpoint.dir is None
    assert cfg.data.seq_len == cfg.train.seq_len and cfg.data.micro_batch == cfg.train.micro_batch
    assert cfg.data.seed == cfg.seed
    assert validate(cfg, 4, has_cuda=False) == 2  # data-parallel size


@pytest.mark.parametrize("overrides, key", [
    (["train.stpes=3"], "train.stpes"),                     # unknown key
    (["optim.lr=1"], "optim"),                              # unknown section
    (["model.hidden_sise=3"], "model.hidden_sise"),         # unknown key of the model section
    (["data.shufle=false"], "data.shufle"),                 # unknown key of the data section
    (["train.steps=abc"], "train.steps"),                   # wrong type
    (["train.lr=fast"], "train.lr"),
    (["parallel.sequence_parallel=maybe"], "parallel.sequence_parallel"),
    (["train.decay=linear"], "train.decay"),                # not one of the choices
    (["train.steps"], "train.steps"),                       # not key=value
    (["model.hidden_size=-1"], "model.hidden_size"),        # the model's own check
    (["data.seq_len=128"], "data.seq_len"),                 # contradicts train.seq_len
    (["train.steps=0"], "train.steps"),
    (["train.min_lr_ratio=2"], "train.min_lr_ratio"),
    (["model.seq_len=128"], "model.seq_len"),               # shorter than train.seq_len
    (["checkpoint.dir=null", "checkpoint.interval=5"], "checkpoint.interval"),
    (["train.recompute_offload=true"], "train.recompute_offload"),   # needs train.recompute
    (["train.recompute_keep_cp_maps=true"], "train.recompute_keep_cp_maps"),   # needs train.recompute
    (["parallel.cp_lean_segment_tokens=-1"], "parallel.cp_lean_segment_tokens"),
    (["parallel.cp_lean_segment_tokens=4096"], "parallel.cp_lean_segment_tokens"),  # needs cp_lean
    (["train.op_backward_segments=0"], "train.op_backward_segments"),
])
def test_bad_value_names_the_key(overrides, key):
    assert key in err(overrides)


def test_cp_lean_settings_reach_the_op_environment(monkeypatch):
    """parallel.cp_lean → MDN_CP_LEAN / MDN_CP_LEAN_SEGMENT_TOKENS, which mdn_kernels.cp reads;
    an environment that says otherwise is named; cp_lean off leaves the environment alone."""
    from mdn_kernels.cp.api import cp_lean
    from mdn_kernels.cp.state_pass_cp import lean_segment_chunks
    from mdn_scale.train.config import apply_op_settings

    for k in ("MDN_CP_LEAN", "MDN_CP_LEAN_SEGMENT_TOKENS"):
        # set, then removed: monkeypatch restores the variable as it was (a plain delenv of
        # an absent one records nothing, and what apply_op_settings sets would stay)
        monkeypatch.setenv(k, "")
        monkeypatch.delenv(k)
    apply_op_settings(load_config(TINY, []))
    assert "MDN_CP_LEAN" not in os.environ and not cp_lean()
    cfg = load_config(TINY, ["parallel.cp_lean=true", "parallel.cp_lean_segment_tokens=4096"])
    validate(cfg, 1, has_cuda=False)
    apply_op_settings(cfg)
    assert os.environ["MDN_CP_LEAN"] == "1" and os.environ["MDN_CP_LEAN_SEGMENT_TOKENS"] == "4096"
    assert cp_lean() and lean_segment_chunks(64) == 4096 // 64
    monkeypatch.setenv("MDN_CP_LEAN_SEGMENT_TOKENS", "8192")
    with pytest.raises(ConfigError, match="MDN_CP_LEAN_SEGMENT_TOKENS=4096.*has MDN_CP_LEAN_SEGMENT_TOKENS=8192"):
        apply_op_settings(cfg)


def test_op_backward_segments_reach_the_op_environment(monkeypatch):
    """train.op_backward_segments → MDN_BWD_SEGMENTS, which mdn_kernels.mdn.chunk reads at each
    call; the op's default (2 segments) leaves the environment alone and is the config's
    default too; another count is set; a conflicting environment is named."""
    from mdn_kernels.mdn.chunk import DEFAULT_BWD_SEGMENTS, bwd_segments
    from mdn_scale.train.config import _OP_DEFAULT_BWD_SEGMENTS, apply_op_settings

    assert _OP_DEFAULT_BWD_SEGMENTS == DEFAULT_BWD_SEGMENTS == 2
    monkeypatch.setenv("MDN_BWD_SEGMENTS", "")   # restored as it was after the test
    monkeypatch.delenv("MDN_BWD_SEGMENTS")
    cfg = load_config(TINY, [])
    assert cfg.train.op_backward_segments == DEFAULT_BWD_SEGMENTS
    apply_op_settings(cfg)
    assert "MDN_BWD_SEGMENTS" not in os.environ and bwd_segments() == 2
    cfg = load_config(TINY, ["train.op_backward_segments=1"])
    validate(cfg, 1, has_cuda=False)
    apply_op_settings(cfg)
    assert os.environ["MDN_BWD_SEGMENTS"] == "1" and bwd_segments() == 1
    monkeypatch.setenv("MDN_BWD_SEGMENTS", "4")
    with pytest.raises(ConfigError, match="MDN_BWD_SEGMENTS=1.*has MDN_BWD_SEGMENTS=4"):
        apply_op_settings(cfg)


def test_parallel_sizes_must_divide_the_world():
    assert "parallel.tensor" in err(["parallel.tensor=2"], world=3)
    assert "parallel.context" in err(["parallel.context=4"], world=2)


def test_global_batch_must_divide_into_microbatches():
    assert "train.global_batch" in err(["train.global_batch=6", "train.micro_batch=4"])
    # 8 sequences, micro-batch 4, DP 4 (world 4): 8 is not a multiple of 16
    assert "train.global_batch" in err([], world=4)


def test_gpu_only_features_are_refused_on_cpu():
    assert "parallel.pipeline" in err(["parallel.pipeline=2"], world=2)
    assert "parallel.sequence_parallel" in err(["parallel.tensor=2", "parallel.sequence_parallel=true"], world=2)
    assert "train.precision" in err(["train.precision=bf16"])


def test_missing_data_names_the_key(tmp_path):
    assert "datasets" in err(["data.datasets=[]"])
    msg = err([f"data.datasets=[{tmp_path}/nothing-here]"])
    assert "data.datasets[0].path" in msg
    no_data = tmp_path / "x.yaml"
    no_data.write_text("train: {steps: 2}\n")
    assert "datasets" in err([], path=str(no_data))


def test_launcher_reports_config_errors_before_any_work(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "pretrain.py"), "--config", TINY,
                        "train.stpes=3", f"logging.dir={tmp_path}/log"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2
    assert "train.stpes" in r.stderr
    assert not os.path.exists(tmp_path / "log")  # nothing was started
