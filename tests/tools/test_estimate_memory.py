"""tools/estimate_memory.py and mdn_scale/train/memory.py: every term against a hand computation
for the tiny model, the CLI, the longest-context search, and the generated long-context configs."""
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mdn_scale.model import ModelConfig
from mdn_scale.model.stats import model_stats
from mdn_scale.train.memory import GIB, Layout, estimate, layer_activation_terms, longest_context, rank_params

ROOT = Path(__file__).resolve().parents[2]
# d=64, 2 layers, H=2, K=16, V=32, F=128, vocab 257 padded to 320 (at every TP size), conv 4, C=64;
# the eager conv and gated norm's counts, whether or not fla-core is installed here
TINY = ModelConfig(hidden_size=64, num_layers=2, num_heads=2, head_k_dim=16, expand_v=2,
                   ffn_hidden_size=128, vocab_size=257, vocab_pad_multiple=64, chunk_size=64,
                   mixer_kernels="eager")


def test_parameters_by_hand():
    # per layer: in_proj 64·(2·2·16 + 2·2·32 + 4·2) = 12800, out_proj 64·64 = 4096,
    # MLP 3·64·128 = 24576; convs 4·(64 + 64) = 512, 6 gate params·2 heads, o_norm 32, norms 128
    layer = 12800 + 4096 + 24576 + 512 + 12 + 32 + 128
    total = 2 * layer + 2 * 320 * 64 + 64
    assert total == 125336 == model_stats(TINY)["params_total"]
    assert rank_params(TINY, Layout(tp=1)) == total
    # TP = 2: matmuls, convs and gate params split; the norms and o_norm (160) replicated; the
    # padded vocabulary (320) split; each rank's 100 in-projection rows get 4 zero alignment rows
    # (model.in_proj_row_multiple: 8), 4·64 parameters more
    layer_tp2 = (12800 + 4096 + 24576) // 2 + 4 * 64 + (512 + 12) // 2 + 160
    assert rank_params(TINY, Layout(tp=2)) == 2 * layer_tp2 + 2 * 160 * 64 + 64
    unpadded = ModelConfig(**{**TINY.to_dict(), "in_proj_row_multiple": 1})
    assert rank_params(unpadded, Layout(tp=2)) == 2 * (layer_tp2 - 4 * 64) + 2 * 160 * 64 + 64


def test_estimate_by_hand_fp32_cp2():
    lay = Layout(tp=1, cp=2, seq_len=1024, precision="fp32", recompute=False)
    est = estimate(TINY, lay, reserve_gib=1.0)
    T_l, P = 512, 125336
    assert est["tokens_per_rank"] == T_l
    assert (est["parameters"], est["gradients"], est["optimizer"]) == (4 * P, 4 * P, 8 * P)
    assert est["autocast_weight_copies"] == 0
    zero = estimate(TINY, Layout(tp=1, cp=2, seq_len=1024, precision="fp32", distributed_optimizer=True))
    assert zero["optimizer"] == 8 * P // 2  # ZeRO-1 over dp×cp = 2 ranks
    # fp32 (torch path) counts: d=64, H=2, K=16, V=32, C=64, F=128, Vp=320, a=4
    around = 64 * 8 + (64 + 128 + 8) * 4 + 2 * (64 + 64) * 4 + 32 * 4 + 16 * 4 * 2 + 64 * 20 + 64 * 8 + 4 * 128 * 4
    assert around == 6432
    after = 64 * 20 + 64 * 8 + 4 * 128 * 4  # gated norm, second norm, MLP: freed before the op's backward
    op_head = 4 * (64 + 32 + 32) + 4 * 13 * 64 + 4 * (2 * 64 + 32 + 32 + 32 + 32)  # = 4864
    pairs = 2 * (4 * 2 * 16 * 32 / 64)  # S0s, M0s per token: 2 heads × 64 bytes
    layer = around + 2 * op_head + pairs
    assert est["activations_kept"] == 2 * T_l * layer
    # CP: groups of 64 · ⌈16·16/64⌉ = 256 tokens → 2 groups, each a 2K×2K fp32 map per head;
    # no later ranks' maps at R = 2
    cp_layer = 2 * 2 * 32 ** 2 * 4
    assert est["cp_maps_kept"] == 2 * cp_layer
    cp_backward = 12 * 2 * 2 * 16 * 32 * 4
    assert est["backward_workspace"] == T_l * (2 * op_head + pairs) + 2 * T_l * 64 * 4 + cp_backward
    assert est["final_norm_and_loss_kept"] == T_l * (8 * 64 + 4) + T_l * 320 * 4 + 9 * T_l
    assert est["loss_forward_transient"] == T_l * 320 * 4
    assert est["loss_backward_transient"] == T_l * 320 * 4 + 4 * 320 * 64
    assert est["recurrent_states"] == 2 * 2 * 1 * 2 * 16 * 32 * 4
    assert est["cp_allgather_buffer"] == 2 * 2 * 32 * (32 + 32) * 4
    static = 16 * P
    kept = 2 * T_l * layer + 2 * cp_layer
    loss_kept = T_l * (8 * 64 + 4) + T_l * 320 * 4 + 9 * T_l
    moments = {"forward_end": static + kept + loss_kept + T_l * 320 * 4,
               "loss_backward": static + kept + loss_kept + T_l * 320 * 4 + 4 * 320 * 64,
               "layer_backward": static + kept - T_l * after + est["backward_workspace"]
               + est["recurrent_states"] + est["cp_allgather_buffer"],
               # every layer's tensors are kept anyway; fc2's input gradient 2F·a, three fp32 [T, d]
               "mlp_backward": static + kept + T_l * (2 * 128 * 4 + 3 * 64 * 4)
               + est["recurrent_states"] + est["cp_allgather_buffer"]}
    assert est["mlp_backward_transient"] == T_l * (2 * 128 * 4 + 3 * 64 * 4)
    assert est["moments"] == {k: int(v) for k, v in moments.items()}
    assert est["peak_at"] == "layer_backward"
    assert est["allocated"] == int(moments["layer_backward"])
    assert est["total"] == est["allocated"] + GIB


def test_estimate_by_hand_bf16_recompute_chunked_loss(monkeypatch):
    """The bf16 counts (checked against autograd's saved tensors in tests/model/test_chunked_loss.py)
    by hand for the tiny model, recompute on, chunked loss; the eager conv and gated norm (the
    fused ones: tests/model/test_mixer_kernels.py)."""
    cfg = ModelConfig(**{**TINY.to_dict(), "loss_chunk_tokens": 100})
    T_l, P, d, Vp = 1024, 125336, 64, 320
    est = estimate(cfg, Layout(seq_len=T_l, precision="bf16", recompute=True), reserve_gib=0)
    t = layer_activation_terms(cfg, Layout(precision="bf16"))
    # P_qkv = 2·(32 + 32) = 128; before the op: norm 10d + 4 = 644, conv + SiLU 2·128 + 2·4
    # (the padded input and the mask; the conv is recomputed in the backward), bf16 q|k|v 2·128,
    # gates 15·4·2 (the op reads v as a slice of q|k|v: no copy since session 15)
    before = 644 + (256 + 8) + 256 + 120
    after = (18 * 64 + 8) + 644 + 10 * 128  # gated norm, second norm, MLP
    assert (t["around_op"], t["after_op"]) == (before + after, after) == (1284 + 3084, 3084)
    # op per head (C = 64): q̂ k̂ as the corrected q 2K (the raw q, k kept, MDN_RAW_QK; k is a
    # view of q|k|v) + Y Z Kg Km 8K + (I+A)⁻¹ Γ 8C + 28 + W 2V + 12/C (the chunk bounds are
    # made once per micro-batch, shared by the layers)
    assert t["op_chunk_tensors"] == 2 * (32 + 128 + 512 + 28 + 64 + 12 / 64) == 1528.375
    # MDN_RAW_QK=0 (the earlier path): the fp32 q̂, k̂ chunks 8K and the op's copy of v 2·2·32
    monkeypatch.setenv("MDN_RAW_QK", "0")
    t0 = layer_activation_terms(cfg, Layout(precision="bf16"))
    assert t0["op_chunk_tensors"] == 2 * (128 + 128 + 512 + 28 + 64 + 12 / 64) == 1720.375
    assert t0["around_op"] == t["around_op"] + 128
    monkeypatch.delenv("MDN_RAW_QK")
    # MDN_STATE_KFAC=1: the factors k̂, T (bf16) and c_g, c_m (fp32) kept in place of Y Z Kg Km
    # (2K + 2C + 8 against 8K: more at this small head, less from K > C/3 + 1 on); not under CP
    monkeypatch.setenv("MDN_STATE_KFAC", "1")
    tk = layer_activation_terms(cfg, Layout(precision="bf16"))
    assert tk["op_chunk_tensors"] == 2 * (32 + (32 + 128 + 8) + 512 + 28 + 64 + 12 / 64)
    cp2_kfac = layer_activation_terms(cfg, Layout(precision="bf16", cp=2))
    monkeypatch.delenv("MDN_STATE_KFAC")
    assert cp2_kfac == layer_activation_terms(cfg, Layout(precision="bf16", cp=2))
    # the pairs are recomputed in the backward (StateOutput), kept only under CP
    assert t["op_state_pairs"] == 0
    cp2 = layer_activation_terms(cfg, Layout(precision="bf16", cp=2))
    assert cp2["op_state_pairs"] == 2 * 2 * 2 * 16 * 32 / 64 == 64
    # backward: LocalOutput grads 8K + 12 + 4C + 2V + 4KV/C, the recomputed S0s, M0s 4KV/C
    # (W is saved: MDN_SAVE_W), dS_end, dM_end written over the output's pair grads, dKg 2K
    # (556), or later, larger at this small head, the last products: the output's chunk-input
    # grads 8K + 12 + 4C, S0s, M0s, dW̃ 2V and dKg, dKm, dY, dZ 4·2K (620); under CP the state
    # pass's 2V + 4KV/C and fp32 4V + 16K instead
    assert t["op_backward"] == 2 * max((128 + 12 + 256 + 64 + 32) + 32 + 32,
                                       (128 + 12 + 256) + 32 + 64 + 4 * 32) == 1240
    assert cp2["op_backward"] == 2 * ((128 + 12 + 256 + 64 + 32) + (64 + 32) + (128 + 256)) == 1944
    layer = 1284 + 3084 + 1528.375 + 0
    assert est["autocast_weight_copies"] == 2 * P
    assert est["activations_kept"] == T_l * (4 * d + 1 * 2 * d)  # fp32 embedding output, one bf16 input
    assert est["activations_rebuilt_layer"] == int(T_l * layer)
    assert est["final_norm_and_loss_kept"] == T_l * 644 + 12 * T_l
    assert est["loss_forward_transient"] == 2 * Vp * d + 100 * Vp * 6
    assert est["loss_backward_transient"] == 2 * Vp * d + 4 * Vp * d + 2 * Vp * d + 100 * Vp * 8 + T_l * d * 2
    assert est["backward_workspace"] == T_l * 1240 + 2 * T_l * d * 4
    kept = T_l * 6 * d
    layer_backward = 16 * P + kept + T_l * (layer - after) + T_l * 1240 + 2 * T_l * d * 4 + est["recurrent_states"]
    assert est["moments"]["layer_backward"] == int(layer_backward)
    # the MLP's backward in the rebuilt layer: all of it alive, fc2's input gradient 2F·2, three
    # fp32 [T, d] gradients
    mlp_backward = 16 * P + kept + T_l * layer + T_l * (2 * 128 * 2 + 3 * d * 4) + est["recurrent_states"]
    assert est["moments"]["mlp_backward"] == int(mlp_backward)
    assert est["allocated"] == max(est["moments"].values())


def test_cp_lean_node_and_segments_by_hand(monkeypatch):
    """The op's terms under CP, bf16, per token (TINY: H=2, K=16, V=32, C=64; a pair is
    2·2·K·V/C = 32 bytes per token and head): the default CP path keeps the pairs; the lean
    node (MDN_CP_LEAN) keeps none and holds its per-chunk backward tensors for one segment
    (MDN_CP_LEAN_SEGMENT_TOKENS) beside full-size gradient buffers."""
    monkeypatch.delenv("MDN_CP_LEAN", raising=False)
    monkeypatch.delenv("MDN_CP_LEAN_SEGMENT_TOKENS", raising=False)

    def terms(**kw):
        return layer_activation_terms(TINY, Layout(cp=2, seq_len=1024, precision="bf16", **kw))
    local = 4 * 2 * 16 + 12 + 4 * 64                    # the output's chunk-input gradients: 396
    default = terms()
    assert default["op_state_pairs"] == 2 * 32
    # the output's gradients with its pair gradients, dW̃ + dS_end, dM_end, fp32 products
    assert default["op_backward"] == 2 * ((local + 2 * 32 + 32) + (2 * 32 + 32) + (4 * 32 + 4 * 4 * 16))
    # dW and the output's pair gradients (dS_end/dM_end written over the latter), recomputed
    # S0s/M0s, fp32 products (dU, dY, dZ, dKg, dKm, three gate sums); W is saved (MDN_SAVE_W),
    # not recomputed
    per_chunk = (2 * 32 + 32) + 32 + (4 * 32 + 4 * 4 * 16 + 12)
    assert per_chunk == 524
    # unsegmented, the node peaks at its end: the bf16 casts of dW̃, dY..dKm beside their fp32
    # products (2V + 4·2K)
    casts = 2 * 32 + 4 * 2 * 16
    lean = terms(cp_lean=True)
    assert lean["op_state_pairs"] == 0 and lean["op_backward"] == 2 * (local + per_chunk + casts)
    # 128-token segments of the rank's 512 tokens: a quarter of the per-chunk tensors, plus the
    # full-size buffers of the state pass's input gradients (bf16 dU, dY..dKm; fp32 gate sums)
    seg = terms(cp_lean=True, cp_lean_segment_tokens=128)
    assert seg["op_backward"] == 2 * (local + (2 * 32 + 2 * 4 * 16 + 12) + per_chunk / 4)
    assert seg["op_backward"] == 1462
    # with W recomputed from U (MDN_SAVE_W=0): its 2V per chunk more
    monkeypatch.setenv("MDN_SAVE_W", "0")
    assert terms(cp_lean=True)["op_backward"] == 2 * (local + per_chunk + casts + 2 * 32)
    monkeypatch.delenv("MDN_SAVE_W")
    # with separate end cotangent buffers (MDN_END_OVER_PAIR_GRADS=0) one pair more per chunk
    monkeypatch.setenv("MDN_END_OVER_PAIR_GRADS", "0")
    assert terms(cp_lean=True)["op_backward"] == 2 * (local + per_chunk + casts + 32)
    monkeypatch.delenv("MDN_END_OVER_PAIR_GRADS")
    # the environment, as the op reads it; without CP the lean node does not apply
    monkeypatch.setenv("MDN_CP_LEAN", "1")
    monkeypatch.setenv("MDN_CP_LEAN_SEGMENT_TOKENS", "128")
    assert terms() == seg
    one = layer_activation_terms(TINY, Layout(cp=1, seq_len=1024, precision="bf16"))
    assert one == layer_activation_terms(TINY, Layout(cp=1, seq_len=1024, precision="bf16", cp_lean=False))


def test_recompute_bf16_and_scaling():
    base = Layout(seq_len=4096, precision="bf16", recompute=True)
    est = estimate(TINY, base, reserve_gib=0)
    assert est["autocast_weight_copies"] == 2 * 125336
    assert est["activations_kept"] == 4096 * (4 * 64 + 2 * 64)  # the layer inputs only
    assert est["activations_rebuilt_layer"] > 0 and est["cp_maps_kept"] == 0
    # activations are linear in the tokens per rank: CP = 4 on 4× the tokens keeps them equal,
    # but for the per-chunk pairs, which only the CP path keeps (StatePass)
    cp4_lay = Layout(seq_len=4 * 4096, cp=4, precision="bf16", recompute=True)
    cp4 = estimate(TINY, cp4_lay, reserve_gib=0)
    for k in ("activations_kept", "final_norm_and_loss_kept"):
        assert cp4[k] == est[k], k
    pairs = layer_activation_terms(TINY, cp4_lay)["op_state_pairs"]
    assert pairs > 0
    assert cp4["activations_rebuilt_layer"] == est["activations_rebuilt_layer"] + int(4096 * pairs)
    assert cp4["backward_workspace"] > est["backward_workspace"]  # + the CP group gradients
    # the chunked loss removes the [T, vocab] terms
    chunked = estimate(ModelConfig(**{**TINY.to_dict(), "loss_chunk_tokens": 256}), base, reserve_gib=0)
    assert chunked["final_norm_and_loss_kept"] < est["final_norm_and_loss_kept"]
    with pytest.raises(ValueError, match="not divisible by cp"):
        estimate(TINY, Layout(seq_len=1000, cp=3))
    with pytest.raises(ValueError, match="num_heads = 2 is not divisible by tp = 4"):
        estimate(TINY, Layout(tp=4))


def test_longest_context_is_the_boundary():
    best = longest_context(TINY, 2, 1.0, reserve_gib=0.25, multiple=1024)
    assert best is not None and best["seq_len"] % 1024 == 0
    assert best["estimate"]["total"] <= 1.0 * GIB
    over = Layout(tp=best["tp"], cp=best["cp"], seq_len=best["seq_len"] + 1024 * best["cp"],
                  recompute=best["recompute"])
    assert estimate(TINY, over, reserve_gib=0.25)["total"] > 1.0 * GIB
    assert longest_context(TINY, 1, 0.001) is None


def _cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "estimate_memory.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_cli(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {k: getattr(TINY, k) for k in (
        "hidden_size", "num_layers", "num_heads", "head_k_dim", "expand_v", "ffn_hidden_size",
        "vocab_size", "vocab_pad_multiple", "chunk_size", "mixer_kernels")}, "parallel": {"context": 2},
        "train": {"seq_len": 1024, "precision": "fp32"}}))
    r = _cli("--config", str(cfg), "--json", "--reserve-gib", "1")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["bytes"]
    assert got == estimate(TINY, Layout(cp=2, seq_len=1024, precision="fp32"), reserve_gib=1.0)
    # --precision overrides the config's train.precision (it was read by --longest only)
    r = _cli("--config", str(cfg), "--json", "--reserve-gib", "1", "--precision", "bf16")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bytes"] == estimate(
        TINY, Layout(cp=2, seq_len=1024, precision="bf16"), reserve_gib=1.0) != got
    # train.op_backward_segments reaches the estimate (CP = 1, two sequences per micro-batch;
    # heads large enough, K = 128, that the pairs make the op's backward peak)
    big = ModelConfig.from_dict({**TINY.__dict__, "head_k_dim": 128})
    seg = _cli("--config", str(cfg), "--json", "--reserve-gib", "1", "--precision", "bf16",
               "model.head_k_dim=128", "parallel.context=1", "train.micro_batch=2",
               "train.op_backward_segments=2")
    assert seg.returncode == 0, seg.stderr
    est = json.loads(seg.stdout)["bytes"]
    lay = lambda n: Layout(seq_len=1024, micro_batch=2, precision="bf16", op_backward_segments=n)  # noqa: E731
    assert est == estimate(big, lay(2), reserve_gib=1.0)
    assert est["backward_workspace"] < estimate(big, lay(1), reserve_gib=1.0)["backward_workspace"]
    r = _cli("--config", str(cfg), "--longest", "--gpus", "1", "2", "--card-gib", "2")
    assert r.returncode == 0 and "longest context" in r.stdout, r.stderr
    r = _cli("--config", str(cfg), "parallel.tensor=4")
    assert r.returncode == 2 and "not divisible by tp = 4" in r.stderr
    r = _cli("--config", str(tmp_path / "none.yaml"))
    assert r.returncode == 2 and "no such file" in r.stderr


def test_longctx_configs_are_current_and_valid():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_longctx_configs.py"), "--check"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    from mdn_scale.model import check_parallel
    from mdn_scale.train.config import load_config, validate

    paths = sorted(glob.glob(str(ROOT / "configs" / "longctx" / "*.yaml")))
    assert len(paths) == 9   # 2 models × 4 lengths, and 1M of the 1.3B on 4 GPUs
    lengths = set()
    for p in paths:
        head = open(p).read().split("\n", 3)
        gpus = int(head[0].split(" on ")[1].split()[0])
        cfg = load_config(p, ["checkpoint.init_from=null"])
        validate(cfg, gpus, has_cuda=True)
        check_parallel(cfg.model, cfg.parallel.tensor, 1, cfg.parallel.context)
        assert cfg.data.packing == "keep_whole" and cfg.train.seq_len == cfg.model.seq_len
        lengths.add(cfg.train.seq_len)
    assert lengths == {32768, 131072, 524288, 1048576}
    # the 4-GPU 1M recipe takes the long-context settings, and its estimate (read from the
    # config, as tools/estimate_memory.py does) fits the card it names
    four = load_config(str(ROOT / "configs" / "longctx" / "mdn_1.3b_1m_4gpu.yaml"), ["checkpoint.init_from=null"])
    assert four.parallel.context == 4 and four.parallel.cp_lean and four.parallel.cp_lean_segment_tokens == 16384
    assert four.train.recompute and four.train.recompute_offload and four.model.mixer_kernels == "fla"
    r = _cli("--config", str(ROOT / "configs" / "longctx" / "mdn_1.3b_1m_4gpu.yaml"), "--json")
    assert r.returncode == 0, r.stderr
    est = json.loads(r.stdout)["bytes"]
    assert est["peak_at"] == "mlp_backward" and est["total"] <= 79.1 * 2 ** 30


def test_measure_script_cpu_smoke(tmp_path):
    """benchmarks/longctx_memory.py's whole logic (trainer, random tokens, CP, recompute, report)
    on CPU in fp32, so the GPU run does not fail on something CPU could show."""
    out = tmp_path / "m.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(ROOT / "benchmarks" / "longctx_memory.py"), "--model", str(ROOT / "configs" / "tiny.yaml"),
                        "--seq-len", "256", "--cp", "2", "--recompute", "--distributed-optimizer",
                        "--cpu-smoke", "--json", str(out)],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    res = json.loads(out.read_text())
    assert res["cp"] == 2 and res["recompute"] and res["distributed_optimizer"] and not res["oom"]
    assert res["estimate_allocated_gib"] > 0 and res["loss"] == res["loss"]  # finite, not NaN
    assert res["skipped_steps"] == 0   # every step's loss and grad norm finite: it trained


def test_measure_script_emulates_a_cp_rank_cpu_smoke(tmp_path):
    """--emulate-cp 2 on one process: trains seq_len / 2 tokens through the CP code paths, and
    reports the run's estimate (optimizer unsharded) beside the real CP = 2 rank's, which differ
    by exactly the optimizer share ZeRO-1 takes away; R < 2 is refused before any work."""
    from mdn_scale.model import ModelConfig
    from mdn_scale.train.memory import GIB, Layout, estimate

    out = tmp_path / "e.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
           str(ROOT / "benchmarks" / "longctx_memory.py"), "--model", str(ROOT / "configs" / "tiny.yaml"),
           "--seq-len", "512", "--emulate-cp", "2", "--recompute", "--distributed-optimizer",
           "--cpu-smoke", "--json", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    res = json.loads(out.read_text())
    assert res["emulate_cp"] == 2 and res["tokens_per_rank"] == 256 and res["cp"] == 1
    assert res["env"]["MDN_CP_EMULATE"] == "1"
    assert res["skipped_steps"] == 0 and res["loss"] == res["loss"]
    import yaml

    mc = ModelConfig(**yaml.safe_load(open(ROOT / "configs" / "tiny.yaml"))["model"])
    lay = Layout(cp=2, seq_len=512, precision="fp32", recompute=True, distributed_optimizer=True)
    rank = estimate(mc, lay)
    assert res["rank_estimate_allocated_gib"] == pytest.approx(rank["allocated"] / GIB)
    assert (res["estimate_allocated_gib"] - res["rank_estimate_allocated_gib"]) * GIB == pytest.approx(
        8 * rank["params_on_rank"] / 2, rel=1e-6)
    bad = subprocess.run(cmd[:-3] + ["--emulate-cp", "1", "--cpu-smoke"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert bad.returncode != 0 and "--emulate-cp R needs R >= 2" in bad.stderr


def test_search_attempt_logs_as_it_runs(tmp_path):
    """An attempt's output reaches its log while it runs: one stopped at its limit keeps what it
    printed (the record reads it back), and a finished one its whole output."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import longctx_search

    log = tmp_path / "a.log"
    cmd = [sys.executable, "-u", "-c", "import time; print('step 1/2 | loss 11.2', flush=True); time.sleep(30)"]
    out, timed_out, _ = longctx_search.run_logged(cmd, 3, str(log))
    assert timed_out and "step 1/2" in out
    text = log.read_text()
    assert text.startswith(sys.executable) and "step 1/2 | loss 11.2" in text
    out, timed_out, rc = longctx_search.run_logged([sys.executable, "-c", "print('done')"], 30, str(log))
    assert not timed_out and rc == 0 and out.strip() == "done"
    out, timed_out, rc = longctx_search.run_logged([sys.executable, "-c", "print('no log')"], 30)
    assert out.strip() == "no log" and rc == 0


def test_search_steps_to_the_boundary(tmp_path, monkeypatch):
    """benchmarks/longctx_search.py with a fake attempt that fits below 100K tokens: it walks the
    ladder 2^k, 3·2^(k−1) down from the start (or up), stops when a fit and a failure are
    neighbours, and records every attempt."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import longctx_search

    assert longctx_search.ladder(2048, 200_000) == [2048, 4096, 6144, 8192, 12288, 16384, 24576, 32768,
                                                     49152, 65536, 98304, 131072, 196608]
    calls = []

    def fake(model, gpus, seq_len, tp, cp, rc, timeout, **kw):
        calls.append(seq_len)
        if seq_len > 100_000:
            return {"seq_len": seq_len, "oom": True}
        return {"seq_len": seq_len, "oom": False, "measured_peak_gib": 1.0, "estimate_allocated_gib": 1.0}

    monkeypatch.setattr(longctx_search, "attempt", fake)
    out = tmp_path / "s.json"
    assert longctx_search.main(["--model", str(ROOT / "configs" / "mdn_1.3b.yaml"), "--gpus", "2",
                                "--out", str(out), "--start", "140000", "--max-attempts", "6"]) == 0
    recs = json.loads(out.read_text())
    assert [r["seq_len"] for r in recs] == calls == [131072, 98304]
    assert recs[0]["oom"] and not recs[1]["oom"]
    calls.clear()
    out2 = tmp_path / "s2.json"
    assert longctx_search.main(["--model", str(ROOT / "configs" / "mdn_1.3b.yaml"), "--gpus", "2",
                                "--out", str(out2), "--start", "40000", "--max-attempts", "6"]) == 0
    assert calls == [32768, 49152, 65536, 98304, 131072]
    # a run that fits in memory but skips steps (non-finite loss or gradients) did not train:
    # the search treats it as a failure and steps down
    calls.clear()

    def fits_but_nan_above_50k(model, gpus, seq_len, tp, cp, rc, timeout, **kw):
        calls.append(seq_len)
        return {"seq_len": seq_len, "oom": False, "measured_peak_gib": 1.0,
                "estimate_allocated_gib": 1.0, "skipped_steps": 2 if seq_len > 50_000 else 0}

    monkeypatch.setattr(longctx_search, "attempt", fits_but_nan_above_50k)
    assert longctx_search.main(["--model", str(ROOT / "configs" / "mdn_1.3b.yaml"), "--gpus", "2",
                                "--out", str(tmp_path / "s3.json"), "--start", "70000",
                                "--max-attempts", "6"]) == 0
    assert calls == [65536, 49152]


def test_search_reads_reports_as_the_ranks_print_them():
    """The attempt's record from its output (benchmarks/longctx_search.record_from_output), as
    session 9's runs printed it: two out-of-memory ranks' reports on one line (the 2-GPU 384K
    attempt: json.loads of the line failed with "Extra data" and took the search down), and a
    complete report followed by a timeout in the shutdown (the 4-GPU 512K attempt, which was
    recorded as a plain timeout)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import longctx_search as ls

    base = {"seq_len": 393216}
    r0 = {"oom": True, "rank": 0, "seconds": 61.9}
    r1 = {"oom": True, "rank": 1, "seconds": 62.0}
    out = ("step 1 ...\n[rank0]: warning\nLONGCTX_MEMORY " + json.dumps(r0) + "LONGCTX_MEMORY "
           + json.dumps(r1) + "\nTraceback ...\n")
    assert ls.reports_in(out) == [r0, r1]
    rec = ls.record_from_output(base, out, False, 1, 85.0)
    assert rec["oom"] and rec["rank"] == 0 and not rec["timeout"] and rec["returncode"] == 1

    done = {"oom": False, "skipped_steps": 0, "measured_peak_gib": 66.6,
            "estimate_allocated_gib": 67.1}
    out = "step 2/2 | loss 11.2 | gnorm 1.35\nLONGCTX_MEMORY " + json.dumps(done) + "\n[rank1]: Broken pipe\n"
    rec = ls.record_from_output({"seq_len": 524288}, out, True, None, 167.5)
    assert rec["timeout"] and rec["measured_peak_gib"] == 66.6 and rec["seq_len"] == 524288
    # no report before the timeout: a timeout, not a fit
    rec = ls.record_from_output({"seq_len": 786432}, "step 1/2 ...\n", True, None, 150.0)
    assert rec["timeout"] and "measured_peak_gib" not in rec and not rec["oom"]
    rec = ls.record_from_output({"seq_len": 1}, "CUDA out of memory. Tried", False, 1, 3.0)
    assert rec["failed"] and rec["oom"]


def test_search_reparse_rebuilds_records_from_logs(tmp_path):
    """--reparse: the records of a search rebuilt from the attempt logs it saved, including an
    attempt whose record the search never wrote (it stopped while reading that output)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import longctx_search as ls

    out = tmp_path / "search.json"
    out.write_text(json.dumps([{"seq_len": 1024, "tp": 1, "cp": 2, "gpus": 2, "timeout": True,
                                "wall_s": 9.0, "estimated_longest": 4096}]))
    fit = {"oom": False, "skipped_steps": 0, "measured_peak_gib": 3.5, "estimate_allocated_gib": 3.4}
    (tmp_path / "search_1024.log").write_text("torchrun ...\nLONGCTX_MEMORY " + json.dumps(fit) + "\n")
    (tmp_path / "search_2048.log").write_text("torchrun --seq-len 2048\nLONGCTX_MEMORY "
                                              + json.dumps({"oom": True, "rank": 1}) + "\n")
    new = tmp_path / "new.json"
    assert ls.main(["--model", "m", "--gpus", "2", "--out", str(out), "--reparse", str(new)]) == 0
    a, b = json.loads(new.read_text())
    assert a["measured_peak_gib"] == 3.5 and a["timeout"] and a["estimated_longest"] == 4096
    assert b["seq_len"] == 2048 and b["oom"] and b["record_missing"]
    assert b["command"] == "torchrun --seq-len 2048"


def test_peak_breakdown_replays_an_allocator_trace():
    """tools/profiling.py peak_breakdown (what benchmarks/longctx_memory.py --peak-breakdown
    reports from a real CUDA allocator trace) on a trace written here: the peak is the largest
    running total of alloc − free_requested, the live set is the one at that event, grouped by the
    innermost model-code frame; frees of blocks allocated before recording are counted."""
    from tests.tools.tool_loader import load_tool

    prof = load_tool("profiling")
    torch_frame = {"filename": "/x/torch/nn/functional.py", "line": 9, "name": "linear"}

    def fr(path, line, name):
        return [torch_frame, {"filename": "/site" + path, "line": line, "name": name}]

    a = fr("/mdn_scale/model/mixer.py", 10, "forward")
    b = fr("/kernels/mdn/chunk.py", 20, "state_pass")
    events = [
        {"action": "free_requested", "addr": 99, "size": 7},            # from before recording
        {"action": "alloc", "addr": 1, "size": 100, "frames": a},
        {"action": "alloc", "addr": 2, "size": 50, "frames": b},
        {"action": "segment_alloc", "addr": 0, "size": 4096},           # not a tensor: ignored
        {"action": "free_requested", "addr": 2, "size": 50},
        {"action": "free_completed", "addr": 2, "size": 50},            # already counted at the request
        {"action": "alloc", "addr": 3, "size": 70, "frames": b},
        {"action": "alloc", "addr": 4, "size": 30, "frames": a},        # peak: 100 + 70 + 30 = 200
        {"action": "free_requested", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 5, "size": 90, "frames": [torch_frame]},  # 190 < 200
    ]
    r = prof.peak_breakdown(events, top=1)
    assert r["peak_bytes"] == 200 and r["event_index"] == 7 and r["live_tensors"] == 3
    assert r["unmatched_frees"] == 1 and r["events"] == len(events)
    assert r["sites"] == [{"site": "mdn_scale/model/mixer.py:10 forward", "bytes": 130, "tensors": 2}]
    assert r["other_bytes"] == 70  # the chunk.py site, beyond top=1
    full = prof.peak_breakdown(events)
    assert {s["site"]: s["bytes"] for s in full["sites"]} == {
        "mdn_scale/model/mixer.py:10 forward": 130, "kernels/mdn/chunk.py:20 state_pass": 70}
    assert prof._site([torch_frame]) == "(no model frame)"
    shim = [{"filename": "/tmp/shim/mdn_kernels/mdn/chunk.py", "line": 7, "name": "forward"}]
    assert prof._site(shim) == "mdn_kernels/mdn/chunk.py:7 forward"  # the GPU machine's link


def test_longctx_configs_do_not_depend_on_the_host(monkeypatch):
    """tools/make_longctx_configs.py writes the same files on a CUDA host as on a CPU one: every
    kernel choice the estimate depends on (conv, norms, gates) is given, not read from
    torch.cuda.is_available() (the gates once were: a GPU host wrote other estimates)."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location(
        "make_longctx_configs", str(ROOT / "tools" / "make_longctx_configs.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    jobs = [(m, n, None) for m in mod.MODELS for n in mod.LENGTHS] + mod.EXTRA
    texts = {}
    for cuda in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda v=cuda: v)
        texts[cuda] = [mod.render(*j) for j in jobs]
    assert texts[True] == texts[False]


def test_kept_cp_maps_add_every_layers_maps_and_entering_pairs():
    """train.recompute_keep_cp_maps under recompute at CP > 1: every layer keeps its CP maps
    (as without recompute) plus the fp32 pair entering each group; nothing changes at CP = 1."""
    raw = yaml.safe_load(open(os.path.join(ROOT, "configs", "mdn_1.3b.yaml")))
    cfg = ModelConfig.from_dict(raw["model"])
    base = dict(cp=4, seq_len=65536, recompute=True)
    plain, kept = estimate(cfg, Layout(**base)), estimate(cfg, Layout(**base, recompute_keep_cp_maps=True))
    L, H, K, V, C = cfg.num_layers, cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim, cfg.chunk_size
    groups = -(-16384 // (C * -(-16 * K // C)))
    per_layer = 2 * H * (2 * K) ** 2 * 4 + groups * H * (2 * K) ** 2 * 4 + groups * H * 2 * K * V * 4
    assert kept["cp_maps_kept"] == L * per_layer, (kept["cp_maps_kept"], per_layer)
    assert kept["allocated"] > plain["allocated"]
    one = dict(cp=1, seq_len=16384, recompute=True)
    assert estimate(cfg, Layout(**one, recompute_keep_cp_maps=True)) == estimate(cfg, Layout(**one))
