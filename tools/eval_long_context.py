"""Long-context evaluation: synthetic passkey retrieval and loss by token position.

    torchrun --nproc-per-node N tools/eval_long_context.py --config runs/x/config.yaml \\
        --weights runs/x/checkpoints --out eval_out/ [--passkey-lengths 4096 16384 65536] \\
        [--depths 0.1 0.5 0.9] [--trials 4] [--position-sequences 8] [--tokenizer tok.json] \\
        [key.sub=value ...]            (e.g. parallel.context=4 train.seq_len=131072)

--weights: our checkpoint dir / step folder, an HF-layout folder, or a canonical .safetensors
(anything checkpoint.init_from takes). Any TP/CP/DP layout of the config; long sequences need CP.
CPU runs (the tiny model, gloo) and GPU runs (NCCL) use the same code.

Passkey retrieval: a prompt of exactly L tokens — filler sentences, a needle "The pass key is
NNNNN. Remember it. NNNNN is the pass key." at a depth fraction of the filler, then "What is the
pass key? The pass key is NNNNN" — scored teacher-forced: the passkey is retrieved when the
model's argmax at every digit position is the right token (what greedy decoding would produce),
and its log-likelihood is recorded. Per (length, depth): accuracy over --trials random keys.

Loss by position: the mean next-token loss at each position since the document start, over
--position-sequences sequences of train.seq_len tokens from the run's validation data (or
--shards), in log-spaced position buckets. Use `data.packing=keep_whole` with long documents
(`data.valid_datasets=[{path: ..., min_doc_tokens: N}]`) so that positions reach seq_len.

Writes to --out: passkey.csv, passkey.md, passkey.png (accuracy by length and depth),
loss_by_position.csv, loss_by_position.md, loss_by_position.png, results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


# ---------------------------------------------------------------- prompts

def passkey_prompt(encode, length: int, depth: float, key: int):
    """(token ids of exactly `length` tokens, positions of the answer's tokens): the answer's
    tokens are the last ones; the needle sits at `depth` of the filler."""
    needle = encode(f"The pass key is {key}. Remember it. {key} is the pass key. ")
    question = encode("What is the pass key? The pass key is")
    answer = encode(f" {key}")
    filler_unit = encode(FILLER)
    n_fill = length - len(needle) - len(question) - len(answer)
    if n_fill < 0:
        raise ValueError(f"passkey length {length} is shorter than the prompt's fixed parts "
                         f"({length - n_fill} tokens)")
    reps = n_fill // max(len(filler_unit), 1) + 1
    filler = (filler_unit * reps)[:n_fill]
    cut = int(round(depth * n_fill))
    ids = filler[:cut] + needle + filler[cut:] + question + answer
    assert len(ids) == length
    return ids, list(range(length - len(answer), length))


def position_buckets(seq_len: int) -> list[tuple[int, int]]:
    """Log-spaced [lo, hi) buckets of positions: [0,1), [1,2), [2,4), ... up to seq_len."""
    edges = [0, 1]
    while edges[-1] < seq_len:
        edges.append(min(edges[-1] * 2, seq_len))
    return list(zip(edges[:-1], edges[1:]))


# ---------------------------------------------------------------- model running

def _to_list(x):
    return [int(t) for t in x]


class Runner:
    """Runs the model on one sequence under the run's layout; every rank calls the methods."""

    def __init__(self, cfg, layout):
        self.cfg, self.layout = cfg, layout

    def build(self):
        from mdn_scale.train.init_from import initialize
        from mdn_scale.train.trainer import build_model

        self.model = build_model(self.cfg, self.layout)
        self.model.eval()
        initialize(self.cfg, self.model, None, log=print if self.layout.is_logger else (lambda *a: None))

    def _inputs(self, tokens, labels, cu=None):
        import torch

        from mdn_scale.data import cp_slice
        from mdn_scale.train.step import to_model_inputs

        T = len(tokens)
        mb = {"tokens": torch.tensor([tokens]), "labels": torch.tensor([labels]),
              "loss_mask": torch.ones(1, T), "cu_seqlens": cu if cu is not None else torch.tensor([0, T], dtype=torch.int32)}
        if self.layout.cp > 1:
            mb = cp_slice(mb, self.layout.cp_rank, self.layout.cp)
        return to_model_inputs(mb, self.layout.device)

    def _gather_cp(self, t):
        """[1, T/cp, ...] slices of the CP ranks → the whole [1, T, ...] on every rank."""
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        if self.layout.cp == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.layout.cp)]
        dist.all_gather(parts, t.contiguous(), group=ps.get_context_parallel_group())
        return torch.cat(parts, 1)

    def token_losses(self, tokens, labels, cu=None):
        """Per-token loss [T] (fp32, CPU) of one sequence."""
        import torch

        from mdn_scale.train.step import autocast

        inp = self._inputs(tokens, labels, cu)
        with torch.no_grad(), autocast(self.cfg.train.precision, self.layout.device):
            loss = self.model(inp["tokens"], None, None, labels=inp["labels"],
                              packed_seq_params=inp["packed_seq_params"])
        return self._gather_cp(loss.float())[0].cpu()

    def argmax(self, tokens):
        """Greedy next-token prediction [T] (CPU) of one sequence (vocab gathered over TP)."""
        import torch
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        from mdn_scale.train.step import autocast

        inp = self._inputs(tokens, tokens)
        with torch.no_grad(), autocast(self.cfg.train.precision, self.layout.device):
            logits = self.model(inp["tokens"], None, None, packed_seq_params=inp["packed_seq_params"])
        if self.layout.tp > 1:
            logits = gather_from_tensor_model_parallel_region(logits)
        vocab = self.cfg.model.vocab_size
        pred = logits[..., :vocab].float().argmax(-1)  # padded vocab rows are never predicted
        return self._gather_cp(pred)[0].cpu()


def run_passkey(runner, encode, lengths, depths, trials: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    rows = []
    for L in lengths:
        for depth in depths:
            hits, lls = 0, []
            for _ in range(trials):
                key = rng.randint(10000, 99999)
                ids, answer_pos = passkey_prompt(encode, L, depth, key)
                tokens, labels = ids[:-1] + [ids[-1]], ids[1:] + [ids[-1]]
                pred = runner.argmax(tokens)
                losses = runner.token_losses(tokens, labels)
                # the token at position p is predicted at position p - 1
                hits += all(int(pred[p - 1]) == ids[p] for p in answer_pos)
                lls.append(-float(sum(losses[p - 1] for p in answer_pos)))
            rows.append({"length": L, "depth": depth, "trials": trials, "accuracy": hits / trials,
                         "mean_loglik": sum(lls) / len(lls)})
    return rows


def run_loss_by_position(runner, sequences, seq_len: int) -> list[dict]:
    """sequences: (tokens [T], labels [T], loss_mask [T], cu_seqlens) of one replica."""
    import torch

    sums = torch.zeros(seq_len, dtype=torch.float64)
    counts = torch.zeros(seq_len, dtype=torch.float64)
    for tokens, labels, mask, cu in sequences:
        losses = runner.token_losses(_to_list(tokens), _to_list(labels), cu).double()
        idx = torch.arange(len(tokens))
        start = cu[torch.searchsorted(cu, idx.to(cu.dtype), right=True) - 1].long()
        pos = idx - start
        sums.index_add_(0, pos, losses * mask.double())
        counts.index_add_(0, pos, mask.double())
    sums, counts = _sum_over_dp(sums, runner.layout.device), _sum_over_dp(counts, runner.layout.device)
    rows = []
    for lo, hi in position_buckets(seq_len):
        n = float(counts[lo:hi].sum())
        rows.append({"from": lo, "to": hi, "tokens": int(n),
                     "loss": float(sums[lo:hi].sum()) / n if n else float("nan")})
    return rows


def _sum_over_dp(t, device):
    """Sum over data-parallel replicas (each read its own sequences); NCCL reduces GPU tensors."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if dist.is_initialized() and ps.get_data_parallel_world_size() > 1:
        on = t.to(device)
        dist.all_reduce(on, group=ps.get_data_parallel_group())
        t = on.cpu()
    return t


# ---------------------------------------------------------------- outputs

def write_tables(out: str, passkey: list[dict], by_pos: list[dict]) -> list[str]:
    import csv

    os.makedirs(out, exist_ok=True)
    written = []
    for name, rows in (("passkey", passkey), ("loss_by_position", by_pos)):
        if not rows:
            continue
        with open(os.path.join(out, f"{name}.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        cols = list(rows[0])
        md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        md += ["| " + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |"
               for r in rows]
        with open(os.path.join(out, f"{name}.md"), "w") as f:
            f.write("\n".join(md) + "\n")
        written += [f"{name}.csv", f"{name}.md"]
    return written


def write_plots(out: str, passkey: list[dict], by_pos: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if passkey:
        lengths = sorted({r["length"] for r in passkey})
        depths = sorted({r["depth"] for r in passkey})
        grid = [[next(r["accuracy"] for r in passkey if r["length"] == L and r["depth"] == d)
                 for L in lengths] for d in depths]
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.6 * len(depths)))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="lower")
        ax.set_xticks(range(len(lengths)), [f"{L:,}" for L in lengths], rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title("passkey retrieval accuracy")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "passkey.png"), dpi=100)
        plt.close(fig)
        written.append("passkey.png")
    pts = [r for r in by_pos if r["tokens"]]
    if pts:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([max(r["from"], 0.5) for r in pts], [r["loss"] for r in pts], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("position since document start (bucket start)")
        ax.set_ylabel("mean next-token loss")
        ax.set_title("loss by token position")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "loss_by_position.png"), dpi=100)
        plt.close(fig)
        written.append("loss_by_position.png")
    return written


# ---------------------------------------------------------------- main

def _encoder(arg: str | None, cfg):
    from mdn_scale.data.tokenizer import ByteTokenizer, load_tokenizer

    if arg in (None, "bytes"):
        if arg is None and cfg.model.vocab_size != 257:
            raise ValueError(f"--tokenizer is needed: model.vocab_size = {cfg.model.vocab_size} is not "
                             "the byte tokenizer's 257 (give a tokenizer.json)")
        tok = ByteTokenizer()
    else:
        if not os.path.isfile(arg):
            raise ValueError(f"--tokenizer: no such file {arg!r}")
        tok = load_tokenizer(arg)
    return lambda text: [int(t) for t in tok.encode(text)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--weights", required=True, help="what checkpoint.init_from takes")
    p.add_argument("--out", required=True)
    p.add_argument("--passkey-lengths", type=int, nargs="*", default=[1024, 4096, 16384])
    p.add_argument("--depths", type=float, nargs="*", default=[0.1, 0.5, 0.9])
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--position-sequences", type=int, default=8,
                   help="sequences per data-parallel rank for the loss by position (0 = skip)")
    p.add_argument("--shards", help="loss by position on these shards instead of the validation data")
    p.add_argument("--tokenizer", help="tokenizer.json, or 'bytes' (default for vocab_size 257)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    a = p.parse_args(argv)

    import dataclasses

    import torch

    from mdn_scale.train.config import ConfigError, load_config, validate
    from mdn_scale.train.distributed import init_distributed, shutdown, world_size_from_env

    try:
        cfg = load_config(a.config, a.overrides + ["checkpoint.interval=0", "eval.interval=0",
                                                   "checkpoint.dir=null", "checkpoint.load=null",
                                                   f"checkpoint.init_from={a.weights}",
                                                   "checkpoint.init_optimizer=fresh", "train.micro_batch=1",
                                                   "data.prefetch=0"])
        if a.shards:
            cfg.data = dataclasses.replace(cfg.data, valid_datasets=[a.shards])
        validate(cfg, world_size_from_env(), has_cuda=torch.cuda.is_available())
        for L in a.passkey_lengths:
            if L % cfg.parallel.context or L < 2:
                raise ValueError(f"--passkey-lengths: {L} is not a multiple of parallel.context = {cfg.parallel.context}")
            if L > cfg.model.seq_len:
                raise ValueError(f"--passkey-lengths: {L} is longer than model.seq_len = {cfg.model.seq_len}")
        if any(not 0 <= d <= 1 for d in a.depths):
            raise ValueError("--depths must lie in [0, 1]")
        if a.trials < 1 or a.position_sequences < 0:
            raise ValueError("--trials must be >= 1 and --position-sequences >= 0")
        encode = _encoder(a.tokenizer, cfg)
    except (ConfigError, ValueError) as e:
        print(f"eval_long_context: error: {e}", file=sys.stderr)
        return 2

    layout = init_distributed(tensor=cfg.parallel.tensor, pipeline=cfg.parallel.pipeline,
                              context=cfg.parallel.context)
    try:
        from mdn_scale.train.distributed import seed_everything

        seed_everything(cfg.seed, layout)
        runner = Runner(cfg, layout)
        runner.build()
        passkey = run_passkey(runner, encode, a.passkey_lengths, a.depths, a.trials, cfg.seed)
        by_pos = []
        if a.position_sequences:
            from mdn_scale.data import build_valid_loader

            seqs = []
            for mb in build_valid_loader(cfg.data, layout.dp_rank, layout.dp):
                seqs.append((mb["tokens"][0], mb["labels"][0], mb["loss_mask"][0], mb["cu_seqlens"]))
                if len(seqs) >= a.position_sequences:
                    break
            by_pos = run_loss_by_position(runner, seqs, cfg.train.seq_len)
        if layout.is_logger:
            files = write_tables(a.out, passkey, by_pos) + write_plots(a.out, passkey, by_pos)
            with open(os.path.join(a.out, "results.json"), "w") as f:
                json.dump({"passkey": passkey, "loss_by_position": by_pos,
                           "layout": layout.as_dict(), "weights": a.weights}, f, indent=1)
            files.append("results.json")
            for r in passkey:
                print(f"passkey L={r['length']:>8,} depth={r['depth']:.2f}: accuracy {r['accuracy']:.2f} "
                      f"loglik {r['mean_loglik']:.2f}")
            for r in by_pos:
                if r["tokens"]:
                    print(f"positions [{r['from']:>8}, {r['to']:>8}): loss {r['loss']:.4f} ({r['tokens']} tokens)")
            print(f"wrote {', '.join(files)} to {a.out}")
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
