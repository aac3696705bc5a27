"""DataConfig: what the loaders read and how they pack it. Checked on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .long_docs import PACKINGS

HOLDOUTS = ("documents", "shards")


@dataclass
class DatasetSpec:
    """One dataset of a mixture.

    path: a manifest file, a folder holding `manifest.json`, a folder of `*.tar` shards, or shard
        paths/URLs: a glob (`data/x/shard-*.tar`), braces (`shard-{000000..000015}.tar`), or any
        URL webdataset opens (`https://...`, `pipe:aws s3 cp s3://b/shard-{000..009}.tar -`).
        Without a manifest nothing checks document/token counts and `vocab_size` is unknown.
    weight: relative share of sequences drawn from this dataset (> 0).
    url_template: read a manifest's shards through this URL instead of from the manifest's folder,
        `{shard}` standing for each shard's name, e.g. "pipe:aws s3 cp s3://bucket/stdlib/{shard} -".
        This (or `path`) is the only place a `pipe:` command may come from: never from a manifest.
    min_doc_tokens, max_doc_tokens: keep only documents of that many tokens (max 0 = no bound).
    upsample_min_tokens, upsample_factor: training reads every document of at least
        upsample_min_tokens tokens upsample_factor times per epoch (long_docs.py).
    """

    path: str
    weight: float = 1.0
    url_template: str | None = None
    min_doc_tokens: int = 0
    max_doc_tokens: int = 0
    upsample_min_tokens: int = 0
    upsample_factor: int = 1

    def check(self, where: str) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"{where}.path must be a non-empty string (got {self.path!r})")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not self.weight > 0:
            raise ValueError(f"{where}.weight must be a number > 0 (got {self.weight!r})")
        if self.url_template is not None and (not isinstance(self.url_template, str) or "{shard}" not in self.url_template):
            raise ValueError(f"{where}.url_template must be a string containing '{{shard}}' (got {self.url_template!r})")
        for name in ("min_doc_tokens", "max_doc_tokens", "upsample_min_tokens", "upsample_factor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "upsample_factor" else 0):
                raise ValueError(f"{where}.{name} must be an integer >= {1 if name == 'upsample_factor' else 0} (got {v!r})")
        if self.max_doc_tokens and self.max_doc_tokens < self.min_doc_tokens:
            raise ValueError(f"{where}.max_doc_tokens = {self.max_doc_tokens} is below min_doc_tokens = {self.min_doc_tokens}")


def _as_spec(x, where: str) -> DatasetSpec:
    if isinstance(x, DatasetSpec):
        spec = x
    elif isinstance(x, str):
        spec = DatasetSpec(path=x)
    elif isinstance(x, dict):
        known = set(DatasetSpec.__dataclass_fields__)
        unknown = sorted(set(x) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown} (known: {', '.join(sorted(known))})")
        if "path" not in x:
            raise ValueError(f"{where}: 'path' is missing")
        spec = DatasetSpec(**x)
    else:
        raise ValueError(f"{where} must be a path string or a mapping with path/weight/url_template (got {type(x).__name__})")
    spec.check(where)
    return spec


@dataclass
class DataConfig:
    """How the train and validation loaders read, split and pack shards.

    datasets: the training mixture: DatasetSpec, a path string, or {path, weight, url_template}.
    seq_len: tokens per sequence T (each sequence reads T+1 tokens: inputs and shifted labels).
    micro_batch: sequences per micro-batch B on each data-parallel rank.
    seed: document and shard order, and the mixture draws (the validation split does not use it).
    reset_at_doc_boundary: document starts inside a row are boundaries in `cu_seqlens` (the MDN
        state restarts there); off: only row starts are.
    validation_fraction: share of each training dataset held out for validation (0 = none).
    holdout: "documents" (a hash of shard name and document key picks each held-out document;
        the validation loader reads every shard) or "shards" (whole shards, picked by a hash of
        their names; cheap to read, needs >= 2 shards per dataset).
    valid_datasets: separate validation data (read whole, in order); replaces the held-out split
        for validation (a validation_fraction still holds documents out of training).
    skip_bad_shards: a missing or unreadable shard is skipped with a logged warning instead of
        stopping the run.
    shard_interleave: shards read at once per dataset; documents are drawn from them at random
        (more mixing, more memory: each open shard is held whole).
    shuffle: shuffle shard order per epoch and documents within shards (train only).
    prefetch: micro-batches prepared ahead by a background thread (0 = none).
    packing: "concat" (cut every T+1 tokens) or "keep_whole" (a document that does not fit in the
        rest of a sequence starts the next one; long_docs.py).
    """

    datasets: list = field(default_factory=list)
    seq_len: int = 2048
    micro_batch: int = 1
    seed: int = 1234
    reset_at_doc_boundary: bool = True
    validation_fraction: float = 0.0
    holdout: str = "documents"
    valid_datasets: list = field(default_factory=list)
    skip_bad_shards: bool = False
    shard_interleave: int = 4
    shuffle: bool = True
    prefetch: int = 2
    packing: str = "concat"

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raise ValueError naming the first bad field."""
        if not isinstance(self.datasets, (list, tuple)) or not self.datasets:
            raise ValueError("datasets must be a non-empty list of dataset paths or {path, weight} mappings")
        self.datasets = [_as_spec(d, f"datasets[{i}]") for i, d in enumerate(self.datasets)]
        if not isinstance(self.valid_datasets, (list, tuple)):
            raise ValueError("valid_datasets must be a list")
        self.valid_datasets = [_as_spec(d, f"valid_datasets[{i}]") for i, d in enumerate(self.valid_datasets)]
        for name in ("seq_len", "micro_batch", "shard_interleave"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1 (got {v!r})")
        for name in ("seed", "prefetch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0 (got {v!r})")
        for name in ("reset_at_doc_boundary", "skip_bad_shards", "shuffle"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false (got {getattr(self, name)!r})")
        f = self.validation_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f < 1:
            raise ValueError(f"validation_fraction must be a number in [0, 1) (got {f!r})")
        if self.packing not in PACKINGS:
            raise ValueError(f"packing must be one of {PACKINGS} (got {self.packing!r})")
        if self.holdout not in HOLDOUTS:
            raise ValueError(f"holdout must be one of {HOLDOUTS} (got {self.holdout!r})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "data") -> "DataConfig":
        """From a config mapping; an unknown key is a ValueError naming `where.key`."""
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be a mapping (got {type(d).__name__})")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {[f'{where}.{k}' for k in unknown]} (known: {sorted(known)})")
        try:
            return cls(**d)
        except ValueError as exn:
            raise ValueError(f"{where}.{exn}") from None
