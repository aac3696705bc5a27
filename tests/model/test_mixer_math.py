"""The mixer against a plain PyTorch re-implementation of DESIGN §6 on top of the token-loop
references (mdn_recurrent_reference; gated_delta_rule_reference for GDN mode), outputs and
gradients, float64; packed documents against separate sequences."""
import math

import pytest
import torch
import torch.nn.functional as F

from model_dist import run_jobs
from mdn_kernels import gated_delta_rule_reference, mdn_recurrent_reference

CFG = dict(hidden_size=32, num_layers=2, num_heads=2, head_k_dim=8, vocab_size=61, seq_len=64,
           ffn_hidden_size=64, chunk_size=8, min_log_mu=-1.5, tau_factor=2.0)


def mixer_worker(rank, world, cfg, x, ct, docs, env=None):
    import os

    import mdn_kernels.cp.api as cp_api
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.spec_utils import build_module
    from mdn_scale.model import ModelConfig, to_transformer_config
    from mdn_scale.model.specs import mdn_mixer_spec
    from model_workers import init_parallel

    os.environ.update(env or {})
    calls = []   # which op path ran: the CP op is wrapped to count its calls, its results are real
    real_cp_op = cp_api.mdn_chunk_cp
    cp_api.mdn_chunk_cp = lambda *a, **kw: calls.append(kw["cp_group"].size()) or real_cp_op(*a, **kw)
    init_parallel()
    mc = ModelConfig(**cfg)
    torch.manual_seed(0)
    mixer = build_module(mdn_mixer_spec(mc), config=to_transformer_config(mc, params_dtype=torch.float64),
                         layer_number=1)
    x = x.clone().requires_grad_(True)
    out, bias = mixer(x)
    assert bias is None
    (out * ct).sum().backward()
    res = dict(params={n: p.detach().clone() for n, p in mixer.named_parameters()},
               out=out.detach(), grads={n: p.grad.clone() for n, p in mixer.named_parameters()},
               x_grad=x.grad.clone())
    # Packed: documents of one stream (B=1) vs each document on its own.
    cu = torch.tensor(docs, dtype=torch.int32)
    xp = x.detach()[:, :1]  # [S, 1, d]
    with torch.no_grad():
        packed, _ = mixer(xp, packed_seq_params=PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu))
        alone = torch.cat([mixer(xp[a:b])[0] for a, b in zip(docs[:-1], docs[1:])], 0)
    res.update(packed=packed, alone=alone, cp_op_calls=calls)
    cp_api.mdn_chunk_cp = real_cp_op
    for k in env or {}:
        os.environ.pop(k)
    return res


def reference_mixer(P, x, cfg, momentum):
    """DESIGN §6 from the weights, written out plainly. x: [S, B, d] -> [S, B, d]."""
    d, H, K = cfg["hidden_size"], cfg["num_heads"], cfg["head_k_dim"]
    V = 2 * K
    xb = x.transpose(0, 1)  # [B, T, d]
    B, T, _ = xb.shape
    names = ["q", "k", "v", "g", "a", "b"] + (["m"] if momentum else []) + ["e"]
    sizes = [H * K, H * K, H * V, H * V, H, H] + ([H] if momentum else []) + [H]
    # rows past the parts are the mixer's alignment pad (model.in_proj_row_multiple): unread
    pad = P["in_proj.weight"].shape[0] - sum(sizes)
    W = dict(zip(names, torch.split(P["in_proj.weight"], sizes + [pad], 0)))
    lin = {n: xb @ W[n].T for n in names}

    def conv(t, w):  # nn.Conv1d depthwise, causal: pad W-1 on the left, keep the first T
        y = F.conv1d(t.transpose(1, 2), w[:, None, :], padding=w.shape[1] - 1, groups=t.shape[-1])
        return y[..., :T].transpose(1, 2)

    q = F.silu(conv(lin["q"], P["q_conv_weight"])).reshape(B, T, H, K)
    k = F.silu(conv(lin["k"], P["k_conv_weight"])).reshape(B, T, H, K)
    v = F.silu(conv(lin["v"], P["v_conv_weight"])).reshape(B, T, H, V)
    tau = math.sqrt(d / cfg["tau_factor"])
    log_alpha = -P["A_log"].exp() * F.softplus(lin["a"] + P["dt_bias"])
    eta = torch.tanh(lin["e"] / tau) + 1
    beta = torch.sigmoid(lin["b"])
    theta = torch.atan(eta * P["log_factor"].exp())
    beta = torch.sin(theta) ** 2 * beta
    log_alpha = torch.log(torch.cos(theta) ** 2) + log_alpha
    q = q - P["D_log"].exp()[:, None] * k
    if momentum:
        log_mu = torch.clamp(-P["Mu_log"].exp() * F.softplus(lin["m"] + P["mu_bias"]), min=cfg["min_log_mu"])
        o, _ = mdn_recurrent_reference(q, k, v, log_alpha, log_mu, beta, eta)
    else:  # μ ≡ 0: the gated delta rule with step size β·η
        o, _ = gated_delta_rule_reference(q, k, v, log_alpha, beta * eta)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * P["o_norm_weight"]
    o = o * torch.sigmoid(lin["g"].reshape(B, T, H, V))
    return (o.reshape(B, T, H * V) @ P["out_proj.weight"].T).transpose(0, 1)


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 2, CFG["hidden_size"], generator=g, dtype=torch.float64)
    ct = torch.randn(20, 2, CFG["hidden_size"], generator=g, dtype=torch.float64)
    return x, ct


@pytest.fixture(scope="module")
def results():
    x, ct = _inputs()
    jobs = [(mixer_worker, (dict(CFG, mixer=m), x, ct, [0, 7, 8, 20])) for m in ("mdn", "gdn")]
    # one rank through the CP code paths (benchmarks/longctx_memory.py --emulate-cp)
    jobs.append((mixer_worker, (dict(CFG, mixer="mdn"), x, ct, [0, 7, 8, 20], {"MDN_CP_EMULATE": "1"})))
    return dict(zip(("mdn", "gdn", "mdn_cp_emulated"), (per_rank[0] for per_rank in run_jobs(1, jobs))))


@pytest.mark.parametrize("mixer", ["mdn", "gdn"])
def test_mixer_matches_design_reference(mixer, results):
    cfg = dict(CFG, mixer=mixer)
    x, ct = _inputs()
    r = results[mixer]
    assert ("Mu_log" in r["params"]) == (mixer == "mdn")
    # d = 32, H = 2, K = 8: 104 rows (mdn) are aligned; the GDN mode's 102 get 2 zero rows, whose
    # gradient (compared below with the reference's, which never reads them) is exactly zero
    rows = r["params"]["in_proj.weight"].shape[0]
    assert rows == 104
    if mixer == "gdn":
        assert torch.equal(r["params"]["in_proj.weight"][102:], torch.zeros(2, 32, dtype=torch.float64))
        assert torch.equal(r["grads"]["in_proj.weight"][102:], torch.zeros(2, 32, dtype=torch.float64))
    P = {n: p.clone().requires_grad_(True) for n, p in r["params"].items()}
    xr = x.clone().requires_grad_(True)
    ref = reference_mixer(P, xr, cfg, momentum=(mixer == "mdn"))
    torch.testing.assert_close(r["out"], ref.detach(), rtol=1e-10, atol=1e-12)
    grads = torch.autograd.grad((ref * ct).sum(), [xr] + list(P.values()))
    torch.testing.assert_close(r["x_grad"], grads[0], rtol=1e-9, atol=1e-12)
    for (n, _), gr in zip(P.items(), grads[1:]):
        torch.testing.assert_close(r["grads"][n], gr, rtol=1e-9, atol=1e-12, msg=lambda m: f"{n}: {m}")
    torch.testing.assert_close(r["packed"], r["alone"], rtol=1e-10, atol=1e-12)


def test_cp_paths_at_one_rank_equal_the_plain_layer(results):
    """MDN_CP_EMULATE=1 at one rank: the CP op (group of one) and the eager conv with its halo
    give the plain layer's output and gradients (float64), and the CP op is what ran; without
    it the CP op is never called at one rank."""
    plain, emu = results["mdn"], results["mdn_cp_emulated"]
    assert plain["cp_op_calls"] == []
    assert emu["cp_op_calls"] and set(emu["cp_op_calls"]) == {1}
    torch.testing.assert_close(emu["out"], plain["out"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(emu["x_grad"], plain["x_grad"], rtol=1e-9, atol=1e-12)
    for n, g in plain["grads"].items():
        torch.testing.assert_close(emu["grads"][n], g, rtol=1e-9, atol=1e-12, msg=lambda m: f"{n}: {m}")
    torch.testing.assert_close(emu["packed"], plain["packed"], rtol=1e-10, atol=1e-12)


def test_cp_emulate_rejects_bad_values(monkeypatch):
    from mdn_scale.model.mixer import cp_paths_at_one_rank

    monkeypatch.setenv("MDN_CP_EMULATE", "yes")
    with pytest.raises(ValueError, match="MDN_CP_EMULATE must be 0 or 1"):
        cp_paths_at_one_rank()


def test_init_ranges(results):
    """DESIGN §6 init: A_log, Mu_log = log U(0,16); log_factor = log U(0,4); D_log = log U(0,1);
    dt_bias, mu_bias = softplus⁻¹(dt) with dt in [1e-3, 1e-1]; o_norm = 1."""
    P = results["mdn"]["params"]
    for name, hi in (("A_log", 16), ("Mu_log", 16), ("log_factor", 4), ("D_log", 1)):
        x = P[name].exp()
        assert bool(((x > 0) & (x <= hi)).all()), name
    for name in ("dt_bias", "mu_bias"):
        dt = F.softplus(P[name])
        assert bool(((dt >= 1e-3 * (1 - 1e-9)) & (dt <= 1e-1 * (1 + 1e-9))).all()), name
    assert torch.equal(P["o_norm_weight"], torch.ones_like(P["o_norm_weight"]))
    assert "Mu_log" not in results["gdn"]["params"]


@pytest.mark.parametrize("B", [1, 3])
def test_out_proj_input_is_one_gemm(B):
    """seq_first hands the out-projection dense [T, B, D] strides, so torch.matmul folds it into
    one GEMM (aten::mm); at B = 1, transpose(0, 1).contiguous() did not (T batched 1-row GEMMs)."""
    from torch.profiler import profile
    from mdn_scale.model.mixer import seq_first

    x = torch.randn(B, 12, 8)
    y = seq_first(x)
    assert torch.equal(y, x.transpose(0, 1))
    assert y.stride() == (B * 8, 8, 1)
    w = torch.randn(5, 8)
    with profile() as prof:
        torch.matmul(y, w.t())
    ops = {e.key for e in prof.key_averages()}
    assert "aten::mm" in ops and "aten::bmm" not in ops, ops
    if B == 1:  # the layout it replaces really is the slow one
        with profile() as prof:
            torch.matmul(x.transpose(0, 1).contiguous(), w.t())
        assert "aten::bmm" in {e.key for e in prof.key_averages()}
