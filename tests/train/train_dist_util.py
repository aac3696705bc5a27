"""Run a function in N real processes (gloo, CPU) for the distributed trainer tests."""

import os
import socket
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, errq):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        fn(rank, world, *args)
    except BaseException:
        errq.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_workers(fn, world: int, *args) -> None:
    """``fn(rank, world, *args)`` in ``world`` spawned processes; re-raises a worker's error."""
    ctx = mp.get_context("spawn")
    errq = ctx.SimpleQueue()
    port = free_port()
    try:
        mp.start_processes(_entry, args=(world, port, fn, args, errq), nprocs=world,
                           start_method="spawn")
    except Exception as e:
        msgs = []
        while not errq.empty():
            r, tb = errq.get()
            msgs.append(f"rank {r}:\n{tb}")
        raise AssertionError("\n".join(msgs) or str(e)) from None


class SyntheticLoader:
    """Stand-in with the data package's loader contract, for trainer tests that must not depend
    on shard contents: sequence g of the global stream is a function of (seed, g) alone; data-
    parallel rank r of D reads sequences r, r+D, ...; micro-batches of B rows flattened into one
    stream with document boundaries (row starts plus one split inside each row)."""

    def __init__(self, *, seq_len, micro_batch, dp_rank=0, dp_size=1, seed=0, vocab=256):
        self.T, self.B, self.r, self.D, self.seed, self.vocab = seq_len, micro_batch, dp_rank, dp_size, seed, vocab
        self.next_row = 0  # rows this replica has consumed

    def _row(self, g):
        import torch

        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + g)
        seq = torch.randint(0, self.vocab, (self.T + 1,), generator=gen)
        cut = int(torch.randint(1, self.T, (1,), generator=gen))
        return seq, cut

    def __iter__(self):
        import torch

        while True:
            rows, cus = [], [0]
            for b in range(self.B):
                g = (self.next_row + b) * self.D + self.r
                seq, cut = self._row(g)
                rows.append(seq)
                cus += [b * self.T + cut, (b + 1) * self.T]
            self.next_row += self.B
            s = torch.stack(rows)
            yield {"tokens": s[:, :-1].contiguous(), "labels": s[:, 1:].contiguous(),
                   "loss_mask": torch.ones(self.B, self.T), "cu_seqlens": torch.tensor(cus, dtype=torch.int32)}

    def state_dict(self):  # global rows consumed: the same under any data-parallel size
        return {"global_rows": self.next_row * self.D}

    def load_state_dict(self, s):
        self.next_row = s["global_rows"] // self.D


TINY_MODEL = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.head_k_dim=8",
              "model.expand_v=2", "model.ffn_hidden_size=64", "model.vocab_size=256",
              "model.vocab_pad_multiple=64",
              "model.chunk_size=16", "model.backend=torch", "model.seq_len=64"]


def tiny_run_config(overrides, data=None):
    """A RunConfig of the tiny model; ``data`` None = the synthetic loader (no data section)."""
    from mdn_scale.model import ModelConfig
    from mdn_scale.train.config import load_config

    base = TINY_MODEL + ["train.seq_len=64", "train.lr=3e-3", "train.warmup_steps=1",
                         "logging.tensorboard=false", "seed=7"]
    return load_config(None, base + list(overrides), foreign={"model": ModelConfig, "data": dict})


def train_with_synthetic_data(cfg, *, data_seed=0):
    """trainer.train under the current process group with SyntheticLoader batches; returns the
    per-step losses read back from metrics.jsonl (rank 0) and the summary."""
    import json
    import os

    from mdn_scale.train import batches, trainer
    from mdn_scale.train.config import validate
    from mdn_scale.train.distributed import init_distributed

    import torch.distributed as dist

    validate(cfg, dist.get_world_size() if dist.is_initialized() else 1, has_cuda=False)
    layout = init_distributed(tensor=cfg.parallel.tensor, pipeline=cfg.parallel.pipeline,
                              context=cfg.parallel.context)
    t = cfg.train

    class Batches(batches.StepBatches):
        def __init__(self, cfg, layout):
            mk = lambda seed: SyntheticLoader(seq_len=t.seq_len, micro_batch=t.micro_batch,
                                              dp_rank=layout.dp_rank, dp_size=layout.dp, seed=seed)
            super().__init__(cfg, layout, loader=mk(data_seed), valid_loader_factory=lambda: mk(999))

    saved = trainer.StepBatches
    trainer.StepBatches = Batches
    try:
        summary = trainer.train(cfg, layout)
    finally:
        trainer.StepBatches = saved
        from megatron.core import parallel_state as ps

        ps.destroy_model_parallel()
    losses = {}
    path = os.path.join(cfg.logging.dir, "metrics.jsonl")
    if layout.rank == 0 and os.path.exists(path):
        for line in open(path):
            r = json.loads(line)
            if "loss" in r:
                losses[r["step"]] = r["loss"]
                summary["skipped_by_step"] = r["skipped_steps"]
    return losses, summary
