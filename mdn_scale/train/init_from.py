"""Start a new run from existing weights (``checkpoint.init_from``): long-context continued
pretraining, fine-tuning, a model imported from the HF layout.

What a new run takes from the source, and what it does not:

- weights, always, resharded into this run's TP/PP/CP/DP layout (the source's layout and
  sequence length do not matter: MDN layers have no positional parameters, and the softmax
  layers' RoPE table is built from ``model.seq_len`` of *this* run);
- Adam moments and their step count (for bias correction) only with
  ``checkpoint.init_optimizer: keep`` and a source in our checkpoint format; ``fresh`` (the
  default) starts them at zero;
- never the schedule, the step counter or the data position: the run starts at step 0 and its
  learning rate re-warms up over ``train.warmup_steps`` to ``train.lr`` (the "re-warmup" of
  continued pretraining). A run whose ``checkpoint.dir`` already holds a checkpoint resumes from
  that instead, so a restarted job does not start over.

Sources (detected from what is on disk, or forced with ``checkpoint.init_format``):

- ``dcp``: our checkpoint — a ``checkpoint.dir`` (its newest complete step) or one
  ``step_XXXXXXXX`` folder (the torch.distributed.checkpoint format of checkpoint.py);
- ``hf``: an HF-layout folder (``config.json`` + ``*.safetensors`` / ``pytorch_model*.bin``, the
  published MDN names, DESIGN §6); its architecture must equal ``model:`` of this run;
- ``canonical``: a canonical ``.safetensors`` file (``tools/convert_checkpoint.py from-hf``).
"""

from __future__ import annotations

import json
import os

from . import checkpoint as ckpt
from .config import ConfigError, RunConfig

FORMATS = ("auto", "dcp", "hf", "canonical")

# ModelConfig fields that fix the parameters' shapes or the layer's math: an HF checkpoint must
# agree on all of them (seq_len, chunk_size and backend may change between runs).
ARCHITECTURE_FIELDS = ("mixer", "hidden_size", "num_layers", "num_heads", "head_k_dim", "expand_v",
                       "ffn_size", "vocab_size", "min_log_mu", "tau_factor", "conv_size",
                       "attention_every", "attention_heads")


def detect_format(path: str) -> str:
    """'dcp', 'hf' or 'canonical' for what lies at ``path``; ConfigError naming it otherwise."""
    if os.path.isfile(path):
        if path.endswith(".safetensors"):
            return "canonical"
        raise ConfigError(f"checkpoint.init_from: {path!r} is a file but not a .safetensors file "
                          "(give our checkpoint folder, an HF folder, or a canonical .safetensors)")
    if not os.path.isdir(path):
        raise ConfigError(f"checkpoint.init_from: no such file or folder {path!r}")
    if os.path.isfile(os.path.join(path, ckpt.META)) or ckpt.list_checkpoints(path):
        return "dcp"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    raise ConfigError(f"checkpoint.init_from: {path!r} holds neither our checkpoints (step_* "
                      "folders / meta.json) nor an HF model (config.json)")


def check_init_config(cfg: RunConfig) -> str | None:
    """Validate the init_from keys before any work; returns the resolved format (or None)."""
    c = cfg.checkpoint
    if c.init_from and c.load:
        raise ConfigError("checkpoint.load and checkpoint.init_from both given: use init_from only "
                          "(load is its weights-only form)")
    src = c.init_from or c.load
    if not src:
        if c.init_optimizer != "fresh":
            raise ConfigError("checkpoint.init_optimizer = keep needs checkpoint.init_from")
        if c.init_format != "auto":
            raise ConfigError("checkpoint.init_format is set but checkpoint.init_from is not")
        return None
    fmt = detect_format(src) if c.init_format == "auto" else c.init_format
    if c.init_format != "auto" and not os.path.exists(src):
        raise ConfigError(f"checkpoint.init_from: no such file or folder {src!r}")
    if c.init_optimizer == "keep" and fmt != "dcp":
        raise ConfigError(f"checkpoint.init_optimizer = keep needs a source in our checkpoint "
                          f"format; {src!r} is '{fmt}' (it holds no optimizer state)")
    return fmt


def _architecture(model_cfg) -> dict:
    return {f: getattr(model_cfg, f) for f in ARCHITECTURE_FIELDS}


def check_same_architecture(ours, theirs, where: str) -> None:
    a, b = _architecture(ours), _architecture(theirs)
    diff = [f"{k}: {where} has {b[k]!r}, model: has {a[k]!r}" for k in a if a[k] != b[k]]
    if diff:
        raise ConfigError(f"checkpoint.init_from: {where} is another architecture:\n  " + "\n  ".join(diff))


VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _vocab_rows_differ(path: str, model) -> bool:
    md = ckpt._SafeReader(path).read_metadata().state_dict_metadata
    ours = ckpt.model_state(model)
    for k in VOCAB_KEYS:
        key = "model/" + k
        if key in md and key in ours and tuple(md[key].size) != tuple(ours[key].global_shape):
            return tuple(md[key].size)[1:] == tuple(ours[key].global_shape)[1:]
    return False


def _full_model_tensors(path: str) -> dict:
    """Every model tensor of our checkpoint, whole, on every rank (read without pickled code)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = ckpt._SafeReader(path).read_metadata().state_dict_metadata
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in md.items()
             if k.startswith("model/") and isinstance(m, TensorStorageMetadata)}
    dcp.load(state, storage_reader=ckpt._SafeReader(path))
    return {k[len("model/"):]: v for k, v in state.items()}


def _resized_vocab(full: dict, cfg: RunConfig, model) -> dict:
    """Vocabulary rows cut or zero-padded to this run's padded size (rows >= vocab_size only)."""
    import torch

    rows = cfg.model.padded_vocab_size(cfg.parallel.tensor)
    for k in VOCAB_KEYS:
        t = full.get(k)
        if t is None or t.shape[0] == rows:
            continue
        if t.shape[0] > rows:
            if rows < cfg.model.vocab_size:
                raise ckpt.CheckpointError(f"{k}: {t.shape[0]} rows do not fit {rows}")
            full[k] = t[:rows]
        else:
            full[k] = torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])], 0)
    return full


def initialize(cfg: RunConfig, model, optimizer, log=print) -> dict:
    """Load the init_from source into ``model`` (and ``optimizer`` with init_optimizer=keep).
    Collective: every rank calls it. Returns what was loaded (for the log and tests)."""
    fmt = check_init_config(cfg)
    if fmt is None:
        return {}
    c = cfg.checkpoint
    src = c.init_from or c.load
    keep_optimizer = c.init_optimizer == "keep"
    if fmt == "dcp":
        if ckpt.STEP_DIR.match(os.path.basename(os.path.normpath(src))):
            found = (src, ckpt.verify(src))
        else:
            found = ckpt.find_loadable(src, log=log)
        if found is None:
            raise ckpt.CheckpointError(f"checkpoint.init_from: no complete checkpoint in {src}")
        path, meta = found
        if _vocab_rows_differ(path, model):
            # Saved with another model.vocab_pad_multiple (or by a version that padded per TP
            # size): the rows beyond vocab_size are padding, so resize them and load full tensors.
            if keep_optimizer:
                raise ckpt.CheckpointError(
                    f"checkpoint.init_from: {path} pads the vocabulary to another size "
                    "(model.vocab_pad_multiple), so its Adam moments do not fit: use "
                    "checkpoint.init_optimizer=fresh")
            from mdn_scale.model.sharding import load_full_state_dict

            load_full_state_dict(model, _resized_vocab(_full_model_tensors(path), cfg, model))
        else:
            # No scheduler: the schedule (and the step counter) restart in the new run.
            ckpt.load(path, meta, model=model, optimizer=optimizer if keep_optimizer else None)
        info = {"format": "dcp", "path": path, "source_step": meta.get("step"),
                "source_layout": meta.get("layout"), "optimizer": "keep" if keep_optimizer else "fresh"}
    else:
        from mdn_scale.model.convert import hf_to_canonical, load_tensors, model_config_from_hf
        from mdn_scale.model.sharding import load_full_state_dict

        if fmt == "hf":
            with open(os.path.join(src, "config.json")) as f:
                theirs = model_config_from_hf(json.load(f))
            check_same_architecture(cfg.model, theirs, os.path.join(src, "config.json"))
            full = hf_to_canonical(load_tensors(src), cfg.model, cfg.parallel.tensor)
        else:
            full = _resized_vocab(load_tensors(src), cfg, model)
        # shapes and names are checked (and every mismatch named) before anything is copied
        load_full_state_dict(model, full)
        info = {"format": fmt, "path": src, "optimizer": "fresh"}
    log(f"[init_from] weights from {info['path']} ({fmt}"
        + (f", step {info['source_step']}, layout {info['source_layout']}" if fmt == "dcp" else "")
        + f"); optimizer {info['optimizer']}; schedule restarts at step 0 with "
        f"{cfg.train.warmup_steps} warmup steps")
    return info
