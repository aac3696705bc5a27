"""Our canonical state dict ↔ the HF-style layout (DESIGN §6 names), and HF folder export/import.

Canonical = what mdn_scale.model.sharding.gather_full_state_dict returns (layout-independent
keys of sharded_state_dict()). HF layout, per layer i (`model.layers.{i}.`):
    attn_norm.weight, mlp_norm.weight, mlp.{gate,up,down}_proj.weight,
    recurrent layers: attn.{q,k,v,a,b,m,e,g,o}_proj.weight, attn.{A_log, Mu_log, dt_bias,
        mu_bias, log_factor, D_log}, attn.{q,k,v}_conv1d.weight [C, 1, W], attn.o_norm.weight
        (m_proj, Mu_log, mu_bias only with momentum),
    attention layers: attn.{q,k,v,o}_proj.weight;
plus model.embeddings.weight, model.norm.weight, lm_head.weight.
The vocabulary rows are kept padded (config.vocab_size = padded size, original_vocab_size =
the tokenizer's), so ours → HF → ours is exact; an HF checkpoint with fewer rows is zero-padded.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from .config import ModelConfig
from .mixer import in_proj_parts, per_head_param_names

HF_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf")
MEG = "decoder.layers.{i}."
HFL = "model.layers.{i}."


def expected_hf_shapes(cfg: ModelConfig, tensor_parallel: int = 1) -> dict[str, tuple]:
    """Every HF key with its shape, for checking files against the config before use."""
    d, F_, Vp = cfg.hidden_size, cfg.ffn_size, cfg.padded_vocab_size(tensor_parallel)
    H, K, V, W = cfg.num_heads, cfg.head_k_dim, cfg.head_v_dim, cfg.conv_size
    s = {"model.embeddings.weight": (Vp, d), "model.norm.weight": (d,), "lm_head.weight": (Vp, d)}
    for i, t in enumerate(cfg.layer_types()):
        p = HFL.format(i=i)
        s.update({p + "attn_norm.weight": (d,), p + "mlp_norm.weight": (d,),
                  p + "mlp.gate_proj.weight": (F_, d), p + "mlp.up_proj.weight": (F_, d),
                  p + "mlp.down_proj.weight": (d, F_)})
        if t == "attention":
            for n in "qkvo":
                s[p + f"attn.{n}_proj.weight"] = (d, d)
            continue
        for n, rows in in_proj_parts(cfg, H):
            s[p + f"attn.{n}_proj.weight"] = (rows, d)
        s[p + "attn.o_proj.weight"] = (d, H * V)
        for n in per_head_param_names(cfg):
            s[p + f"attn.{n}"] = (H,)
        for n, c in (("q", H * K), ("k", H * K), ("v", H * V)):
            s[p + f"attn.{n}_conv1d.weight"] = (c, 1, W)
        s[p + "attn.o_norm.weight"] = (V,)
    return s


def _check(sd: dict, expected: dict, what: str) -> None:
    problems = [f"missing {k} {v}" for k, v in expected.items() if k not in sd]
    problems += [f"{k}: shape {tuple(sd[k].shape)}, config needs {v}" for k, v in expected.items()
                 if k in sd and tuple(sd[k].shape) != tuple(v)]
    problems += [f"unexpected {k}" for k in sd if k not in expected]
    problems += [f"{k}: dtype {sd[k].dtype} is not floating" for k in expected
                 if k in sd and not sd[k].is_floating_point()]
    if problems:
        raise ValueError(f"{what} does not match the model config: " + "; ".join(problems))


def canonical_to_hf(full: dict, cfg: ModelConfig) -> dict:
    """Canonical (our) full state dict -> HF-layout dict (tensors shared, not copied)."""
    out = {"model.embeddings.weight": full["embedding.word_embeddings.weight"],
           "model.norm.weight": full["decoder.final_layernorm.weight"],
           "lm_head.weight": full["output_layer.weight"]}
    H, hd = cfg.attention_heads, cfg.attention_head_dim
    for i, t in enumerate(cfg.layer_types()):
        m, h = MEG.format(i=i), HFL.format(i=i)
        out[h + "attn_norm.weight"] = full[m + "input_layernorm.weight"]
        out[h + "mlp_norm.weight"] = full[m + "pre_mlp_layernorm.weight"]
        gate, up = full[m + "mlp.linear_fc1.weight"].chunk(2, 0)  # Megatron GLU: [gate; up]
        out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate, up
        out[h + "mlp.down_proj.weight"] = full[m + "mlp.linear_fc2.weight"]
        a = m + "self_attention."
        if t == "attention":
            # Megatron's fused qkv rows are grouped per head: [q_h, k_h, v_h] for h = 0..H-1.
            qkv = full[a + "linear_qkv.weight"].view(H, 3, hd, -1)
            for j, n in enumerate("qkv"):
                out[h + f"attn.{n}_proj.weight"] = qkv[:, j].reshape(H * hd, -1)
            out[h + "attn.o_proj.weight"] = full[a + "linear_proj.weight"]
            continue
        for n, _ in in_proj_parts(cfg, cfg.num_heads):
            out[h + f"attn.{n}_proj.weight"] = full[a + f"in_proj.weight.{n}"]
        out[h + "attn.o_proj.weight"] = full[a + "out_proj.weight"]
        for n in per_head_param_names(cfg):
            out[h + f"attn.{n}"] = full[a + n]
        for n in "qkv":
            out[h + f"attn.{n}_conv1d.weight"] = full[a + f"{n}_conv_weight"][:, None, :]
        out[h + "attn.o_norm.weight"] = full[a + "o_norm_weight"]
    return out


def hf_to_canonical(hf: dict, cfg: ModelConfig, tensor_parallel: int = 1) -> dict:
    """HF-layout dict -> canonical. Checks names and shapes against cfg first (ValueError naming
    each mismatch); vocab rows are zero-padded up to the padded vocab size."""
    hf = dict(hf)
    Vp = cfg.padded_vocab_size(tensor_parallel)
    for k in ("model.embeddings.weight", "lm_head.weight"):
        if k in hf and hf[k].dim() == 2 and cfg.vocab_size <= hf[k].shape[0] < Vp:
            pad = hf[k].new_zeros(Vp - hf[k].shape[0], hf[k].shape[1])
            hf[k] = torch.cat([hf[k], pad], 0)
    _check(hf, expected_hf_shapes(cfg, tensor_parallel), "HF checkpoint")
    out = {"embedding.word_embeddings.weight": hf["model.embeddings.weight"],
           "decoder.final_layernorm.weight": hf["model.norm.weight"],
           "output_layer.weight": hf["lm_head.weight"]}
    for i, t in enumerate(cfg.layer_types()):
        m, h = MEG.format(i=i), HFL.format(i=i)
        out[m + "input_layernorm.weight"] = hf[h + "attn_norm.weight"]
        out[m + "pre_mlp_layernorm.weight"] = hf[h + "mlp_norm.weight"]
        out[m + "mlp.linear_fc1.weight"] = torch.cat([hf[h + "mlp.gate_proj.weight"],
                                                      hf[h + "mlp.up_proj.weight"]], 0)
        out[m + "mlp.linear_fc2.weight"] = hf[h + "mlp.down_proj.weight"]
        a = m + "self_attention."
        if t == "attention":
            H, hd = cfg.attention_heads, cfg.attention_head_dim
            parts = [hf[h + f"attn.{n}_proj.weight"].view(H, 1, hd, -1) for n in "qkv"]
            out[a + "linear_qkv.weight"] = torch.cat(parts, 1).reshape(3 * H * hd, -1)
            out[a + "linear_proj.weight"] = hf[h + "attn.o_proj.weight"]
            continue
        for n, _ in in_proj_parts(cfg, cfg.num_heads):
            out[a + f"in_proj.weight.{n}"] = hf[h + f"attn.{n}_proj.weight"]
        out[a + "out_proj.weight"] = hf[h + "attn.o_proj.weight"]
        for n in per_head_param_names(cfg):
            out[a + n] = hf[h + f"attn.{n}"]
        for n in "qkv":
            out[a + f"{n}_conv_weight"] = hf[h + f"attn.{n}_conv1d.weight"][:, 0, :]
        out[a + "o_norm_weight"] = hf[h + "attn.o_norm.weight"]
    return out


def hf_config_dict(cfg: ModelConfig, tensor_parallel: int = 1) -> dict:
    """config.json contents of the exported folder (auto_map → the remote-code modules)."""
    return dict(
        model_type="mdn_scale", architectures=["MDNForCausalLM"],
        auto_map={"AutoConfig": "configuration_mdn.MDNConfig",
                  "AutoModelForCausalLM": "modeling_mdn.MDNForCausalLM"},
        vocab_size=cfg.padded_vocab_size(tensor_parallel), original_vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_heads=cfg.num_heads,
        head_k_dim=cfg.head_k_dim, expand_v=cfg.expand_v, intermediate_size=cfg.ffn_size,
        momentum=cfg.momentum, min_log_mu=cfg.min_log_mu, tau_factor=cfg.tau_factor,
        conv_size=cfg.conv_size, mdn_layer_types=cfg.layer_types(),
        num_attention_heads=cfg.attention_heads, rope_theta=cfg.rope_theta, norm_eps=cfg.norm_eps,
        initializer_range=cfg.init_std, max_position_embeddings=cfg.seq_len,
        tie_word_embeddings=False,
        mdn_scale_model=cfg.to_dict(),  # the exact ModelConfig, for the way back
    )


def model_config_from_hf(hf_cfg: dict) -> ModelConfig:
    """ModelConfig of an HF folder's config.json (ours, or the published HF-style layout)."""
    if "mdn_scale_model" in hf_cfg:
        return ModelConfig.from_dict(hf_cfg["mdn_scale_model"])
    types = hf_cfg.get("mdn_layer_types") or []
    att = [i for i, t in enumerate(types) if t == "attention"]
    every = 0
    if att:
        every = att[0] + 1
        if att != list(range(every - 1, len(types), every)):
            raise ValueError(f"mdn_layer_types {types}: attention layers are not every n-th layer")
    rec = [t for t in types if t != "attention"]
    mixer = "transformer" if types and not rec else ("gdn" if rec and rec[0] == "gdn"
                                                       or not hf_cfg.get("momentum", True) else "mdn")
    return ModelConfig(
        mixer=mixer, hidden_size=hf_cfg["hidden_size"], num_layers=hf_cfg["num_hidden_layers"],
        num_heads=hf_cfg.get("num_heads", 6), head_k_dim=hf_cfg.get("head_k_dim", 128),
        expand_v=hf_cfg.get("expand_v", 2), ffn_hidden_size=hf_cfg["intermediate_size"],
        vocab_size=hf_cfg.get("original_vocab_size") or hf_cfg["vocab_size"],
        min_log_mu=hf_cfg.get("min_log_mu", -2.0), tau_factor=hf_cfg.get("tau_factor", 1.0),
        conv_size=hf_cfg.get("conv_size", 4), attention_every=0 if mixer == "transformer" else every,
        num_attention_heads=hf_cfg.get("num_attention_heads"),
        rope_theta=hf_cfg.get("rope_theta", 10000.0), norm_eps=hf_cfg.get("norm_eps", 1e-6),
        seq_len=hf_cfg.get("max_position_embeddings", 4096))


def export_hf(full: dict, cfg: ModelConfig, out_dir: str, dtype: torch.dtype | None = None) -> None:
    """Write an HF folder: config.json, model.safetensors, and the trust_remote_code modules."""
    from safetensors.torch import save_file

    hf = canonical_to_hf(full, cfg)
    _check(hf, expected_hf_shapes(cfg), "our checkpoint")
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype else v).contiguous().clone() for k, v in hf.items()}
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config_dict(cfg), f, indent=1)
    for name in ("configuration_mdn.py", "modeling_mdn.py"):
        shutil.copyfile(os.path.join(HF_DIR, name), os.path.join(out_dir, name))


def load_tensors(path: str) -> dict:
    """Tensors of a .safetensors file, or of a torch file loaded with weights_only=True (no
    pickled code runs); a folder means every *.safetensors (else pytorch_model*.bin) in it."""
    from safetensors.torch import load_file

    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            files = sorted(f for f in os.listdir(path) if f.startswith("pytorch_model") and f.endswith(".bin"))
        if not files:
            raise ValueError(f"{path}: no *.safetensors or pytorch_model*.bin files")
        out = {}
        for f in files:
            out.update(load_tensors(os.path.join(path, f)))
        return out
    if path.endswith(".safetensors"):
        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a flat dict of tensors")
    return sd


def import_hf(hf_dir: str) -> tuple[ModelConfig, dict]:
    """(ModelConfig, canonical state dict) of an HF folder (config.json + weights)."""
    cfg_path = os.path.join(hf_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise ValueError(f"{hf_dir}: no config.json")
    with open(cfg_path) as f:
        cfg = model_config_from_hf(json.load(f))
    return cfg, hf_to_canonical(load_tensors(hf_dir), cfg)
