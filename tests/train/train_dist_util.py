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

    def __init__(self, *, seq_len, micro_batch, dp_rank=0, dp_size=1, seed=0, vocab=257):
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

    def state_dict(self):
        return {"next_row": self.next_row}

    def load_state_dict(self, s):
        self.next_row = s["next_row"]
