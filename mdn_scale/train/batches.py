"""The microbatches of one optimizer step for this rank, from the data package's loaders.

Each data-parallel replica reads its own share of every global batch (the loader splits by dp
rank); every CP rank of a replica reads the same microbatches and keeps its contiguous slice of
the flattened token stream (``cp_slice``; cu_seqlens stay global). The loader's position is saved
in checkpoints for an exact resume.
"""

from __future__ import annotations

import itertools

from .config import RunConfig
from .distributed import Layout


def _data_api():
    import mdn_scale.data as data

    return data


class StepBatches:
    def __init__(self, cfg: RunConfig, layout: Layout, *, loader=None, valid_loader_factory=None):
        t = cfg.train
        self.layout = layout
        self.micro_per_step = t.global_batch // (t.micro_batch * layout.dp)
        api = None
        if loader is None or valid_loader_factory is None:
            api = _data_api()
        self.loader = loader if loader is not None else api.build_train_loader(
            cfg.data, dp_rank=layout.dp_rank, dp_size=layout.dp)
        self._valid_factory = valid_loader_factory or (
            lambda: api.build_valid_loader(cfg.data, dp_rank=layout.dp_rank, dp_size=layout.dp))
        self._cp_slice = api.cp_slice if api is not None else _cp_slice_reference
        self._iter = iter(self.loader)
        self._valid = None

    def _slice(self, mb: dict) -> dict:
        if self.layout.cp == 1:
            return mb
        return self._cp_slice(mb, self.layout.cp_rank, self.layout.cp)

    def next_step(self) -> list[dict]:
        return [self._slice(next(self._iter)) for _ in range(self.micro_per_step)]

    def validation_batches(self, n: int) -> list[dict]:
        """The first ``n`` validation microbatches of this replica (the same every evaluation)."""
        if self._valid is None:  # re-iterable: each iter() starts again from the beginning
            self._valid = self._valid_factory()
        return [self._slice(mb) for mb in itertools.islice(iter(self._valid), n)]

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict, resharded: bool = False) -> None:
        self.loader.load_state_dict(state)
        self._iter = iter(self.loader)

    def close(self) -> None:
        getattr(self.loader, "close", lambda: None)()


def _cp_slice_reference(mb: dict, cp_rank: int, cp_size: int) -> dict:
    """Contiguous 1/cp_size slice of the flattened stream (for injected test loaders)."""
    out = dict(mb)
    for k in ("tokens", "labels", "loss_mask"):
        flat = mb[k].reshape(1, -1)
        n = flat.shape[1] // cp_size
        out[k] = flat[:, cp_rank * n:(cp_rank + 1) * n]
    return out
