"""Run configuration: dataclass schema, YAML loading, dotted CLI overrides, validation.

A run config is one YAML file with the sections below plus ``key.sub=value`` overrides from the
command line. Every value is checked against the type of its dataclass field, and every key must
exist: a typo stops the run before any process group, model or data is built, with a message
that names the key. The ``model`` and ``data`` sections belong to other packages; their schemas
are those packages' dataclasses (``mdn_scale.model.ModelConfig``, ``mdn_scale.data.DataConfig``),
checked the same way.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from .deepspeed_config import DeepSpeedConfig, check_deepspeed_config

# mdn_kernels.mdn.chunk.DEFAULT_BWD_SEGMENTS, the op's segments where MDN_BWD_SEGMENTS is unset,
# written out so that reading a config does not import the kernels (a test keeps the two equal)
_OP_DEFAULT_BWD_SEGMENTS = 2


class ConfigError(ValueError):
    """A config key is unknown, has a bad value, or contradicts the world it runs in."""


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    context: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False  # ZeRO-1: optimizer state sharded over dp×cp
    # Under CP, the op's lean node (kernels/cp/state_pass_cp.CPStateOutput): no per-chunk state
    # pair kept between forward and backward (recomputed), and with cp_lean_segment_tokens > 0
    # its backward in segments of that many tokens (whole groups); the long-context settings
    # (BENCHMARKS.md, session 10). The op reads them as MDN_CP_LEAN, MDN_CP_LEAN_SEGMENT_TOKENS.
    cp_lean: bool = False
    cp_lean_segment_tokens: int = 0


@dataclass
class TrainConfig:
    steps: int = 100
    global_batch: int = 8  # sequences per optimizer step, over all data-parallel replicas
    micro_batch: int = 1  # sequences per forward/backward on one rank
    seq_len: int = 256
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    warmup_steps: int = 0
    decay: Literal["cosine", "wsd"] = "cosine"
    wsd_decay_fraction: float = 0.2  # WSD: the last fraction of steps decays linearly
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = no clipping
    precision: Literal["fp32", "bf16"] = "fp32"
    recompute: bool = False  # full activation recomputation of every layer
    # with recompute: each layer's kept input waits in pinned host memory between its forward
    # and its backward (train/recompute.py); for long contexts, where those inputs add up
    recompute_offload: bool = False
    # with recompute under CP: the CP op's group maps, the pair entering each group and the
    # later ranks' maps are kept from each layer's forward for its recompute instead of made
    # again (mdn_kernels/cp/kept.py): the maps run once per step; they stay alive from the
    # layer's forward to its backward
    recompute_keep_cp_maps: bool = False
    # the MDN op's backward (CP = 1) in this many segments of consecutive chunks, one after
    # another, cutting long sequences where it must (then the forward runs in segments too): its
    # per-chunk state pairs and their cotangents exist for one segment at a time (less peak
    # memory, a little more time; 2, the op's own default, measured in BENCHMARKS.md session 21;
    # 1: no segments)
    op_backward_segments: int = 2  # = _OP_DEFAULT_BWD_SEGMENTS
    skip_nonfinite: bool = True  # a step whose loss or gradient norm is not finite is not applied
    # the Megatron backend: each linear's weight gradient added into its fp32 .grad by one GEMM
    # inside the backward (Megatron's gradient-accumulation fusion, train/wgrad.py) instead of a
    # bf16 gradient, a cast and an add; DeepSpeed's engine owns its gradients and ignores it
    fuse_wgrad: bool = True
    # under CP, before step 1: layer 0 under CP against one rank (train/cp_check.py); a machine
    # where CP is wrong stops the run with an error naming the worst parameter
    cp_check: bool = True
    backend: Literal["megatron", "deepspeed"] = "megatron"  # deepspeed: deepspeed_backend.py


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None
    interval: int = 0  # save every N steps, at the end and on SIGTERM/SIGUSR1; 0 = never save
    keep_last: int = 2  # keep this many complete checkpoints; 0 = keep all
    load: Optional[str] = None  # a new run's initial weights (only) from this checkpoint dir
    # A new run starts from these weights (our checkpoint dir / step folder, an HF folder, or a
    # canonical .safetensors) in its own layout and seq_len; step 0, fresh schedule (init_from.py).
    init_from: Optional[str] = None
    init_optimizer: Literal["fresh", "keep"] = "fresh"  # keep: Adam moments of our checkpoint
    init_format: Literal["auto", "dcp", "hf", "canonical"] = "auto"


@dataclass
class LoggingConfig:
    dir: str = "runs/demo"
    interval: int = 1
    tensorboard: bool = True


@dataclass
class EvalConfig:
    interval: int = 0  # 0 = no validation during training
    batches: int = 4


@dataclass
class RunConfig:
    seed: int = 1234
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: Any = None  # mdn_scale.model.ModelConfig
    data: Any = None  # mdn_scale.data.DataConfig
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)  # train.backend=deepspeed

    def to_dict(self) -> dict:
        return _to_plain(self)


def _foreign_schemas() -> dict[str, type]:
    """The dataclasses of the sections other packages own (imported lazily: they pull torch)."""
    from mdn_scale.data import DataConfig
    from mdn_scale.model import ModelConfig

    return {"model": ModelConfig, "data": DataConfig}


# ---------------------------------------------------------------- typed conversion

def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _schema_of(cls: type, name: str, foreign: dict[str, type]) -> Any:
    if cls is RunConfig and name in foreign:
        return foreign[name]
    return _field_types(cls)[name]


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to type ``tp``; raise ConfigError naming ``key`` if it can't."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if args and not (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
            if origin is tuple and len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            items = [_coerce(v, args[0] if origin is list else args[i], f"{key}[{i}]")
                     for i, v in enumerate(value)]
        elif args:
            items = [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
        else:
            items = list(value)
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-3" as a string
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        try:
            return tp(value)
        except Exception:
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls: type, raw: Any, prefix: str, foreign: dict[str, type] | None = None) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {raw!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"unknown config key '{where}' (known in {prefix or 'the top level'}: "
                              f"{', '.join(sorted(names))})")
    kwargs = {}
    for k, v in raw.items():
        where = f"{prefix}.{k}" if prefix else k
        tp = _schema_of(cls, k, foreign or {})
        kwargs[k] = _coerce(v, tp, where)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # the dataclass's own __post_init__ checks
        raise ConfigError(f"{prefix or 'config'}: {e}") from e


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------- loading

def apply_override(raw: dict, override: str) -> None:
    """Set ``a.b.c=value`` in the raw nested dict (value parsed as YAML, typed later)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key.sub=value")
    key, text = override.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise ConfigError(f"override {override!r} has an empty key")
    node = raw
    for i, p in enumerate(parts[:-1]):
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            section = ".".join(parts[: i + 1])
            raise ConfigError(f"override {override!r}: '{section}' is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else ""


def load_config(path: str | None, overrides: list[str] = (), *,
                foreign: dict[str, type] | None = None) -> RunConfig:
    """Read YAML ``path`` (or start from the defaults), apply overrides, type-check every key."""
    raw: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"--config: no such file {path!r}")
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for ov in overrides:
        apply_override(raw, ov)
    if foreign is None:
        foreign = _foreign_schemas()
    for name in ("model", "data"):
        if raw.get(name) is None:
            raw[name] = {}
    _fill_shared_keys(raw, foreign)
    return _build(RunConfig, raw, "", foreign)


# The data loader's config repeats three run-level values; the run's are the source of truth.
_SHARED = {"seq_len": ("train", "seq_len"), "micro_batch": ("train", "micro_batch"),
           "seed": (None, "seed")}


def _fill_shared_keys(raw: dict, foreign: dict[str, type]) -> None:
    data_cls = foreign.get("data")
    if not dataclasses.is_dataclass(data_cls):
        return
    data_fields = {f.name for f in dataclasses.fields(data_cls)}
    defaults = {"train": TrainConfig(), None: RunConfig()}
    for key, (section, name) in _SHARED.items():
        if key not in data_fields:
            continue
        src = raw.get(section, {}) if section else raw
        if not isinstance(src, dict):
            continue
        run_key = f"{section}.{name}" if section else name
        value = src.get(name, getattr(defaults[section], name))
        value = _coerce(value, _field_types(TrainConfig if section else RunConfig)[name], run_key)
        if key in raw["data"]:
            given = _coerce(raw["data"][key], int, f"data.{key}")
            if given != value:
                raise ConfigError(f"data.{key} = {given} contradicts {run_key} = {value}: leave "
                                  f"data.{key} out (it is taken from {run_key})")
        raw["data"][key] = value


def apply_op_settings(cfg: RunConfig) -> None:
    """parallel.cp_lean / cp_lean_segment_tokens and train.op_backward_segments → the
    environment the op reads at each call (mdn_kernels: MDN_CP_LEAN, MDN_CP_LEAN_SEGMENT_TOKENS,
    MDN_BWD_SEGMENTS). A variable already set to another value is a conflict, named; settings at
    their defaults (cp_lean off, the op's default segments) leave the environment as it is."""
    import os

    p, t = cfg.parallel, cfg.train
    wanted = []
    if p.cp_lean:
        wanted += [("parallel.cp_lean", "MDN_CP_LEAN", "1"),
                   ("parallel.cp_lean", "MDN_CP_LEAN_SEGMENT_TOKENS", str(p.cp_lean_segment_tokens))]
    if t.op_backward_segments != _OP_DEFAULT_BWD_SEGMENTS:
        wanted.append(("train.op_backward_segments", "MDN_BWD_SEGMENTS", str(t.op_backward_segments)))
    for what, key, want in wanted:
        have = os.environ.get(key)
        if have is not None and have != want:
            raise ConfigError(f"{what} settings ask for {key}={want}, but the environment "
                              f"has {key}={have}: unset it or make the two agree")
        os.environ[key] = want


def validate(cfg: RunConfig, world_size: int, *, has_cuda: bool) -> int:
    """Check the config against the world it will run in; return the data-parallel size."""
    p, t = cfg.parallel, cfg.train
    for key, v in (("parallel.tensor", p.tensor), ("parallel.pipeline", p.pipeline),
                   ("parallel.context", p.context), ("train.steps", t.steps),
                   ("train.global_batch", t.global_batch), ("train.micro_batch", t.micro_batch),
                   ("train.seq_len", t.seq_len), ("logging.interval", cfg.logging.interval)):
        if v < 1:
            raise ConfigError(f"{key} must be >= 1, got {v}")
    for key, v in (("checkpoint.interval", cfg.checkpoint.interval),
                   ("checkpoint.keep_last", cfg.checkpoint.keep_last),
                   ("train.warmup_steps", t.warmup_steps), ("eval.interval", cfg.eval.interval),
                   ("eval.batches", cfg.eval.batches), ("train.grad_clip", t.grad_clip),
                   ("train.weight_decay", t.weight_decay)):
        if v < 0:
            raise ConfigError(f"{key} must be >= 0, got {v}")
    if not t.lr > 0:
        raise ConfigError(f"train.lr must be > 0, got {t.lr}")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    if not 0 < t.wsd_decay_fraction <= 1:
        raise ConfigError(f"train.wsd_decay_fraction must be in (0, 1], got {t.wsd_decay_fraction}")
    if t.op_backward_segments < 1:
        raise ConfigError(f"train.op_backward_segments must be >= 1, got {t.op_backward_segments}")
    if p.cp_lean_segment_tokens < 0:
        raise ConfigError(f"parallel.cp_lean_segment_tokens must be >= 0, got {p.cp_lean_segment_tokens}")
    if p.cp_lean_segment_tokens and not p.cp_lean:
        raise ConfigError("parallel.cp_lean_segment_tokens segments the lean CP node: set "
                          "parallel.cp_lean=true as well")
    if t.recompute_keep_cp_maps and not t.recompute:
        raise ConfigError("train.recompute_keep_cp_maps keeps the CP op's maps for the recompute "
                          "of train.recompute: set train.recompute=true as well")
    if t.recompute_offload and not t.recompute:
        raise ConfigError("train.recompute_offload keeps the inputs that train.recompute keeps in "
                          "host memory: set train.recompute=true as well")
    check_deepspeed_config(cfg, error=ConfigError)
    model_parallel = p.tensor * p.pipeline * p.context
    if world_size % model_parallel:
        raise ConfigError(
            f"parallel.tensor × parallel.pipeline × parallel.context = {p.tensor}×{p.pipeline}×"
            f"{p.context} = {model_parallel} does not divide the world size {world_size}")
    dp = world_size // model_parallel
    if t.global_batch % (t.micro_batch * dp):
        raise ConfigError(
            f"train.global_batch = {t.global_batch} is not divisible by train.micro_batch × "
            f"data-parallel size = {t.micro_batch}×{dp}")
    if (t.micro_batch * t.seq_len) % p.context:
        raise ConfigError(f"train.micro_batch × train.seq_len = {t.micro_batch * t.seq_len} tokens "
                          f"is not divisible by parallel.context = {p.context}")
    model_seq = getattr(cfg.model, "seq_len", None)
    if isinstance(model_seq, int) and model_seq < t.seq_len:
        raise ConfigError(f"model.seq_len = {model_seq} is shorter than train.seq_len = {t.seq_len}")
    if p.pipeline > 1 and not has_cuda:
        raise ConfigError("parallel.pipeline > 1 needs CUDA GPUs: Megatron's pipeline schedules "
                          "allocate on 'cuda' (DESIGN.md §9)")
    if p.sequence_parallel and p.tensor == 1:
        raise ConfigError("parallel.sequence_parallel needs parallel.tensor > 1")
    if p.sequence_parallel and not has_cuda:
        raise ConfigError("parallel.sequence_parallel needs CUDA GPUs: Megatron's sequence-parallel "
                          "scatter/gather allocates on 'cuda' (megatron-core 0.16.1)")
    if t.precision == "bf16" and not has_cuda and t.backend != "deepspeed":  # DeepSpeed: bf16 weights, no autocast
        raise ConfigError("train.precision=bf16 needs CUDA GPUs: Megatron's tensor-parallel linear "
                          "layers run their backward outside CPU autocast (use fp32 on CPU)")
    from .init_from import check_init_config

    check_init_config(cfg)
    if cfg.checkpoint.interval and not cfg.checkpoint.dir:
        raise ConfigError("checkpoint.interval > 0 needs checkpoint.dir")
    if cfg.eval.interval and cfg.eval.batches < 1:
        raise ConfigError("eval.batches must be >= 1 when eval.interval > 0")
    if cfg.eval.interval and hasattr(cfg.data, "validation_fraction") and not (
            cfg.data.validation_fraction > 0 or getattr(cfg.data, "valid_datasets", None)):
        raise ConfigError("eval.interval > 0 needs validation data: set data.validation_fraction "
                          "> 0 or data.valid_datasets (or eval.interval=0)")
    return dp


def save_resolved(cfg: RunConfig, directory: str) -> str:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "config.yaml")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)
    return path
