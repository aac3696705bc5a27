"""Whole-model training throughput, MFU and peak memory (issue 9), under torchrun, any layout.

    torchrun --nproc-per-node 1 tools/bench_model.py --config configs/mdn_400m.yaml --out r.json
    torchrun --nproc-per-node 4 tools/bench_model.py --config configs/mdn_1.3b.yaml --cp 4 \\
        --seq-len 16384 --out r.json                                # CP weak scaling (4K per GPU)
    torchrun --nproc-per-node 2 tools/bench_model.py --config configs/mdn_400m.yaml --pp 2 --vp 2 \\
        --microbatches 8 model.num_layers=24 --out r.json            # interleaved 1F1B
    torchrun --nproc-per-node 2 tools/bench_model.py --cpu-smoke --tp 2 --out r.json   # CPU check

What is timed: full optimizer steps of the trainer (MegatronBackend.forward_backward + step:
forward/backward over the step's microbatches through the trainer's step function, Megatron's
pipeline schedules under PP (1F1B, interleaved with --vp), gradient reduction over dp×cp, global
grad norm, clipping, AdamW update), on the trainer's model (build_model with weights drawn on the
CPU, so every layout starts from the same weights), optimizer, scheduler, process groups and
microbatch slicing (StepBatches). Only the data is synthetic: a token stream seeded by --seed and
the step number (each sequence a random block of 256 tokens repeated, so the loss falls), the
same global batch under every layout, so losses of different layouts (PP against PP = 1, DP, TP,
CP) are comparable to rounding. --warmup steps first, then --steps timed ones, each between CUDA
events (wall clock on CPU); the step time reported is the median.

Numbers (rank 0 writes --out, JSON):
  tokens_per_s_per_gpu  global_batch · seq_len / median step time / world size.
  mfu                   tokens_per_s_per_gpu · F / peak, with F the model FLOPs per token of a
                        training step = 3 × forward, forward = 2·N_matmul (every matmul weight:
                        projections, MLP, LM head; not the embedding lookup) + the mixer's own
                        FLOPs (conv, recurrence 10·H·K·V per layer, the chunk form's intra-chunk
                        products; softmax attention 2·d·(S+1) per layer) — mdn_scale/model/stats.py.
                        Recomputation (--recompute) is not counted (model FLOPs, not hardware
                        FLOPs). peak = --peak-tflops (989.5: H100 SXM dense bf16).
                        Also mfu_6n: the same with F = 6·N_non_embedding only.
  peak_memory_gib       torch.cuda.max_memory_allocated over the run (weights, grads and AdamW
                        state included), the largest over ranks; per rank beside it.
  losses                the timed steps' losses (warmup_losses: the warm-up ones).

Peers (--mixer): mdn, gdn (our layer with momentum off), transformer (our blocks with Megatron's
SelfAttention; use configs/transformer_400m.yaml for a same-size model) and megatron_gdn:
megatron-core's own GatedDeltaNet layer with FLA's kernels (mdn_scale/model/megatron_gdn.py; GPU
and `fla` only, no CP). FLA 0.6.0 refuses its gated backward on Hopper with Triton < 3.7.1 (FLA
issue #640, a miscompile); for megatron_gdn this script lifts that guard FOR TIMING ONLY (its
losses are not trusted) and says so in the JSON (`fla_guard_lifted`).

Extra `key.sub=value` arguments override the config (e.g. model.num_layers=24 for PP = 4 or
interleaving, where 21 layers do not split).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
TOOLS = os.path.join(ROOT, "tools")
if TOOLS not in sys.path:  # tools/profiling.py (also when imported by the tests)
    sys.path.append(TOOLS)

MIXERS = ("mdn", "gdn", "transformer", "megatron_gdn")
H100_SXM_BF16_TFLOPS = 989.5
REPEAT_BLOCK = 256  # synthetic sequences repeat a random block of this many tokens
MFU_DEFINITION = (
    "mfu = tokens/s per GPU x F / peak; F = model FLOPs per token of a training step = 3 x forward; "
    "forward = 2 x N_matmul (all matmul weights incl. LM head, not the embedding) + mixer FLOPs "
    "(causal conv, recurrence 10*H*K*V per layer, chunk-form intra-chunk products, softmax "
    "attention 2*d*(S+1) per attention layer), mdn_scale/model/stats.py; recompute not counted. "
    "mfu_6n uses F = 6 x N_non_embedding only.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results JSON (written by rank 0)")
    p.add_argument("--config", default=None, help="run or model YAML (default: configs/mdn_400m.yaml, "
                   "configs/tiny.yaml with --cpu-smoke)")
    p.add_argument("--mixer", choices=MIXERS, default=None, help="override model.mixer "
                   "(megatron_gdn: Megatron-core's GatedDeltaNet at the config's sizes)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 4096; "
                   "64 with --cpu-smoke); under CP each rank holds seq_len/cp of every sequence")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per microbatch")
    p.add_argument("--microbatches", type=int, default=None,
                   help="microbatches per step on each rank (default 1; 2·pp under PP)")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vp", type=int, default=1, help="model chunks per pipeline rank (> 1: "
                   "Megatron's interleaved schedule)")
    p.add_argument("--sp", action="store_true", help="sequence parallelism (needs --tp > 1)")
    p.add_argument("--distributed-optimizer", action="store_true")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                   help="default bf16 (autocast, fp32 weights: the trainer's mixed precision); "
                        "fp32 with --cpu-smoke")
    p.add_argument("--recompute", action="store_true", help="full per-layer activation recompute")
    p.add_argument("--recompute-offload", action="store_true",
                   help="with --recompute: the layers' kept inputs in host memory (train.recompute_offload)")
    p.add_argument("--recompute-keep-cp-maps", action="store_true",
                   help="with --recompute under CP: the CP op's maps kept for the recompute "
                        "(train.recompute_keep_cp_maps)")
    p.add_argument("--backend", choices=("auto", "triton", "torch"), default=None,
                   help="override model.backend (the MDN op's)")
    p.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_TFLOPS,
                   help="dense bf16 peak per GPU for MFU (989.5 = H100 SXM)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-cp-check", action="store_true",
                   help="skip the CP startup check (mdn_scale/train/cp_check.py) that --cp > 1 runs "
                        "and records under 'cp_check'")
    p.add_argument("--no-lift-fla-guard", action="store_true",
                   help="megatron_gdn: keep FLA's Hopper guard (its backward then refuses to run)")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="check the script on CPU: gloo, torch backend, fp32, 2 steps, tiny config "
                        "by default; the numbers mean nothing")
    p.add_argument("--profile", default=None, metavar="PATH",
                   help="after the timed steps, profile --profile-steps more steps with "
                        "torch.profiler and write the tables (top 40 by self CUDA and by self CPU "
                        "time, per-step wall, GPU-busy ms, device events) to PATH (rank 0)")
    p.add_argument("--profile-steps", type=int, default=2, help="profiled steps (--profile)")
    p.add_argument("--profile-sites", action="store_true",
                   help="with --profile: record Python stacks too and add a table of the ops' "
                        "time by call site (tools/profiling.op_sites: which line of the model, or "
                        "which backward node, ran each copy, cat, mul, ...)")
    p.add_argument("--cprofile", default=None, metavar="PATH",
                   help="after the timed steps (and --profile), run --profile-steps more steps "
                        "under Python's cProfile and write rank 0's top 50 functions by own time "
                        "and by cumulative time to PATH: where the host's time goes when a step "
                        "is bound by Python and kernel launches rather than the GPU")
    p.add_argument("--sync-report", default=None, metavar="PATH",
                   help="(CUDA) after the timed steps, one more step with torch.cuda's sync debug "
                        "mode: where the host synchronised with the GPU, counted by code site, "
                        "as JSON to PATH (rank 0's; every rank's count in the result)")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    a = p.parse_intermixed_args(argv)  # overrides may come before or between options
    if a.cpu_smoke:
        a.config = a.config or os.path.join(ROOT, "configs", "tiny.yaml")
        a.seq_len = a.seq_len or 64
        a.precision = a.precision or "fp32"
        a.backend = a.backend or "torch"
        if "--steps" not in (argv if argv is not None else sys.argv):
            a.steps = 2
        if "--warmup" not in (argv if argv is not None else sys.argv):
            a.warmup = 1
    a.config = a.config or os.path.join(ROOT, "configs", "mdn_400m.yaml")
    a.seq_len = a.seq_len or 4096
    a.precision = a.precision or "bf16"
    if a.microbatches is None:
        a.microbatches = 2 * a.pp if a.pp > 1 else 1
    for name in ("seq_len", "micro_batch", "microbatches", "tp", "cp", "pp", "vp", "steps",
                 "profile_steps"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.warmup < 0:
        p.error("--warmup must be >= 0")
    if a.vp > 1 and a.pp == 1:
        p.error("--vp > 1 (interleaved schedule) needs --pp > 1")
    if a.sp and a.tp == 1:
        p.error("--sp needs --tp > 1")
    if a.mixer == "megatron_gdn" and a.cp > 1:
        p.error("--mixer megatron_gdn: Megatron's GatedDeltaNet has no context parallelism (0.16.1)")
    if a.profile_sites and not a.profile:
        p.error("--profile-sites needs --profile PATH (the tables go there)")
    if a.sync_report and a.cpu_smoke:
        p.error("--sync-report needs CUDA (torch.cuda's sync debug mode); drop --cpu-smoke")
    if a.mixer == "megatron_gdn" and a.cpu_smoke:
        p.error("--mixer megatron_gdn needs a GPU and fla (its parameters are created on CUDA)")
    bad = [o for o in a.overrides if "=" not in o]
    if bad:
        p.error(f"overrides must be key.sub=value, got {bad}")
    return a


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def run_config(a, world: int, has_cuda: bool):
    """The trainer's RunConfig for this benchmark (validated against the world like a run's)."""
    from mdn_scale.train.config import load_config, validate

    dp = world // (a.tp * a.cp * a.pp) if world % (a.tp * a.cp * a.pp) == 0 else 1
    model_mixer = "gdn" if a.mixer == "megatron_gdn" else a.mixer
    ov = [f"seed={a.seed}", f"parallel.tensor={a.tp}", f"parallel.pipeline={a.pp}",
          f"parallel.context={a.cp}", f"parallel.sequence_parallel={str(a.sp).lower()}",
          f"parallel.distributed_optimizer={str(a.distributed_optimizer).lower()}",
          f"train.seq_len={a.seq_len}", f"train.micro_batch={a.micro_batch}",
          f"train.global_batch={a.micro_batch * a.microbatches * dp}",
          f"train.steps={a.warmup + a.steps}", f"train.precision={a.precision}",
          f"train.recompute={str(a.recompute).lower()}",
          f"train.recompute_offload={str(a.recompute_offload).lower()}",
          f"train.recompute_keep_cp_maps={str(a.recompute_keep_cp_maps).lower()}", "eval.interval=0", "checkpoint.interval=0",
          "checkpoint.dir=null", "logging.tensorboard=false",
          # model-only configs (configs/mdn_400m.yaml) name no data; the tokens are synthetic
          # (SyntheticTokens), so the data section is never read
          "data.datasets=[synthetic]"]
    if model_mixer:
        ov.append(f"model.mixer={model_mixer}")
    if a.backend:
        ov.append(f"model.backend={a.backend}")
    ov += list(a.overrides)
    cfg = load_config(a.config, ov)
    if cfg.model.seq_len < a.seq_len:  # the model's longest sequence (softmax layers' RoPE)
        cfg = load_config(a.config, ov + [f"model.seq_len={a.seq_len}"])
    validate(cfg, world, has_cuda=has_cuda)
    return cfg


class SyntheticTokens:
    """This dp rank's microbatches of a fixed token stream: step s's global batch is drawn from
    a generator seeded by (seed, s), the same under every layout; rank r of D takes sequences
    [r·G/D, (r+1)·G/D). Each sequence is a random block of REPEAT_BLOCK tokens repeated (a
    learnable stream: the loss falls, so steps differ). Microbatches: dicts as the data
    package's loader yields them (tokens, labels, loss_mask [B, T], cu_seqlens)."""

    def __init__(self, *, seed: int, vocab: int, seq_len: int, micro_batch: int,
                 global_batch: int, dp_rank: int, dp: int):
        self.seed, self.vocab, self.T, self.B = seed, vocab, seq_len, micro_batch
        self.G, self.r, self.D = global_batch, dp_rank, dp

    def __iter__(self):
        step = 0
        while True:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            block = torch.randint(0, self.vocab, (self.G, REPEAT_BLOCK), generator=g)
            reps = (self.T + 1 + REPEAT_BLOCK - 1) // REPEAT_BLOCK
            seqs = block.repeat(1, reps)[:, :self.T + 1]
            per = self.G // self.D
            mine = seqs[self.r * per:(self.r + 1) * per]
            for i in range(0, per, self.B):
                x = mine[i:i + self.B]
                yield {"tokens": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous(),
                       "loss_mask": torch.ones(x.shape[0], self.T),
                       "cu_seqlens": torch.arange(0, x.shape[0] + 1, dtype=torch.int32) * self.T}
            step += 1

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def build_chunks(cfg, a, layout):
    """The trainer's model for this rank: one GPTModel, or --vp chunks (interleaved)."""
    from megatron.core import parallel_state as ps

    from mdn_scale.model import build_model, to_transformer_config
    from mdn_scale.train.config import apply_op_settings
    from mdn_scale.train.recompute import enable_layer_recompute

    overrides = {"use_cpu_initialization": True}  # as the trainer: same weights in every layout
    block_spec_fn = None
    if a.mixer == "megatron_gdn":
        from mdn_scale.model import megatron_gdn

        overrides.update(megatron_gdn.transformer_config_overrides(cfg.model))
        block_spec_fn = megatron_gdn.block_spec
    if a.vp > 1:
        overrides["virtual_pipeline_model_parallel_size"] = a.vp
    config = to_transformer_config(
        cfg.model, tensor_parallel=layout.tp, pipeline_parallel=layout.pp,
        context_parallel=layout.cp, sequence_parallel=cfg.parallel.sequence_parallel, **overrides)
    chunks = []
    for vp_stage in (range(a.vp) if a.vp > 1 else [None]):
        if vp_stage is None:  # as trainer.build_model
            m = build_model(cfg.model, config=config, pre_process=ps.is_pipeline_first_stage(),
                            post_process=ps.is_pipeline_last_stage(), block_spec_fn=block_spec_fn)
        else:
            m = build_model(cfg.model, config=config, vp_stage=vp_stage, block_spec_fn=block_spec_fn)
        if cfg.train.recompute:
            enable_layer_recompute(m, offload=cfg.train.recompute_offload,
                                   keep_cp_maps=cfg.train.recompute_keep_cp_maps)
        apply_op_settings(cfg)
        chunks.append(m.to(layout.device))
    return chunks


def count_params(module, device) -> int:
    """Parameters of the whole model (TP shards once, summed over TP and PP ranks)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    from mdn_scale.model.mixer import unpadded_numel

    # the in-projection's alignment rows are not counted (they are zero and not in checkpoints)
    n = sum(unpadded_numel(p) for p in module.parameters() if param_is_not_tensor_parallel_duplicate(p))
    t = torch.tensor([n], dtype=torch.float64, device=device)
    for group in (ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()):
        if dist.get_world_size(group) > 1:
            dist.all_reduce(t, group=group)
    return int(t.item())


def versions(extra: dict) -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "megatron.core"):
        try:
            mod = __import__(name, fromlist=["_"])
            out[name.replace(".", "_")] = getattr(mod, "__version__", "?")
        except Exception:  # noqa: BLE001 - a missing package is reported as null
            out[name.replace(".", "_")] = None
    out.update(extra)
    return out


def gather_per_rank(values: list[float], layout) -> list[list[float]]:
    """Every rank's `values` (one all_gather of a float64 vector on the layout's device), in
    rank order."""
    mine = torch.tensor(values, dtype=torch.float64, device=layout.device)
    gathered = [torch.zeros_like(mine) for _ in range(layout.world)]
    dist.all_gather(gathered, mine)
    return [g.tolist() for g in gathered]


def profile_run(a, layout, cuda: bool, one_step, data) -> dict:
    """--profile: --profile-steps more whole steps (new data, after the timed ones) under
    torch.profiler; every rank profiles, rank 0 writes its tables to a.profile. Returns rank 0's
    per-step summary (wall ms, GPU-busy ms, device events, self CPU ms) and every rank's."""
    from profiling import op_sites, profile_steps, profile_summary, profile_tables

    steps = [data.next_step() for _ in range(a.profile_steps)]
    it = iter(steps)
    dist.barrier()
    prof, wall = profile_steps(lambda: one_step(next(it)), a.profile_steps, cuda,
                               stacks=a.profile_sites)
    s = profile_summary(prof, a.profile_steps)
    s["wall_ms"] = wall
    rows = gather_per_rank([s[k] for k in sorted(s)], layout)
    per_rank = {k: [row[i] for row in rows] for i, k in enumerate(sorted(s))}
    if layout.is_logger:
        text = [f"tools/bench_model.py --profile: {a.profile_steps} whole optimizer steps after the "
                f"timed ones; command: {' '.join(sys.argv)}; tables of rank 0"]
        for k, v in per_rank.items():
            text.append(f"  {k:>15} per step, per rank: " + ", ".join(f"{x:.3f}" for x in v))
        text += profile_tables(prof, cuda, rows=40, ranges=("bench.", "mdn."))
        if a.profile_sites:
            text += op_sites(prof, cuda, top=60, steps=a.profile_steps)
        os.makedirs(os.path.dirname(os.path.abspath(a.profile)) or ".", exist_ok=True)
        with open(a.profile, "w") as f:
            f.write("\n".join(text) + "\n")
    return {"path": a.profile, "steps": a.profile_steps, **s, "per_rank": per_rank}


def sync_report_run(a, layout, one_step, data) -> dict:
    """--sync-report: one more step under torch.cuda's sync debug mode (profiling.sync_sites);
    rank 0 writes its sites to a.sync_report. Returns rank 0's total and every rank's."""
    from profiling import sync_sites

    step = data.next_step()
    dist.barrier()
    try:   # a diagnostic: its failure must not cost the timed steps' record
        sites, error = sync_sites(lambda: one_step(step)), None
    except Exception as e:  # noqa: BLE001
        sites, error = {}, f"{type(e).__name__}: {e}"
        print(f"--sync-report failed on rank {layout.rank}: {error}", file=sys.stderr, flush=True)
    per_rank = [int(row[0]) for row in
                gather_per_rank([float(sum(sites.values()) if error is None else -1)], layout)]
    if layout.is_logger:
        os.makedirs(os.path.dirname(os.path.abspath(a.sync_report)) or ".", exist_ok=True)
        with open(a.sync_report, "w") as f:
            json.dump({"command": " ".join(sys.argv), "steps": 1, "rank": 0, "error": error,
                       "syncs_per_rank": per_rank, "sites": sites}, f, indent=1)
    return {"path": a.sync_report, "syncs": sum(sites.values()), "syncs_per_rank": per_rank,
            "error": error}


def cprofile_run(a, layout, cuda: bool, one_step, data) -> None:
    """--cprofile: --profile-steps more steps under cProfile (every rank runs them: collectives);
    rank 0 writes its tables. Host time only: CUDA kernels run asynchronously, so a function's
    time is its Python and launch cost, plus any wait on the device it makes (syncs)."""
    import cProfile
    import io
    import pstats

    steps = [data.next_step() for _ in range(a.profile_steps)]
    dist.barrier()
    if cuda:
        torch.cuda.synchronize()
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    for mb in steps:
        one_step(mb)
    prof.disable()
    if cuda:
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) * 1e3 / a.profile_steps
    if layout.is_logger:
        buf = io.StringIO()
        buf.write(f"tools/bench_model.py --cprofile: {a.profile_steps} steps, wall {wall:.1f} ms per "
                  f"step (host and device); command: {' '.join(sys.argv)}; rank 0\n")
        for key in ("tottime", "cumulative"):
            buf.write(f"\n=== top 50 by {key} (totals over the {a.profile_steps} steps) ===\n")
            pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(50)
        os.makedirs(os.path.dirname(os.path.abspath(a.cprofile)) or ".", exist_ok=True)
        with open(a.cprofile, "w") as f:
            f.write(buf.getvalue())


def main(argv=None):
    a = parse_args(argv)
    if os.environ.get("MDN_HANG_DUMP_S"):   # a run that hangs prints every thread's stack then
        import faulthandler                   # (PP = 2 sat silent for 295 s in sessions 6 and 7)
        faulthandler.dump_traceback_later(float(os.environ["MDN_HANG_DUMP_S"]), repeat=True)
    if a.cpu_smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # gloo and CPU tensors even where GPUs exist
    has_cuda = torch.cuda.is_available() and not a.cpu_smoke
    if not a.cpu_smoke and not has_cuda:
        sys.exit("bench_model.py needs CUDA GPUs (run it on the GPU machine under torchrun), "
                 "or --cpu-smoke to check it on CPU")
    from mdn_scale.model import stats
    from mdn_scale.train.batches import StepBatches
    from mdn_scale.train.distributed import init_distributed, seed_everything, shutdown
    from mdn_scale.train.megatron_backend import MegatronBackend
    from mdn_scale.train.step import count_tokens

    world = world_size()
    cfg = run_config(a, world, has_cuda)
    extra = {}
    if a.mixer == "megatron_gdn" and not a.no_lift_fla_guard:
        from fla_peer import lift_fla_guard
        extra = lift_fla_guard()
    layout = init_distributed(tensor=a.tp, pipeline=a.pp, context=a.cp,
                              virtual_pipeline=a.vp if a.vp > 1 else None)
    from megatron.core import parallel_state as ps

    seed_everything(cfg.seed, layout)
    t = cfg.train
    t0 = time.perf_counter()
    chunks = build_chunks(cfg, a, layout)
    owner = torch.nn.ModuleList(chunks)
    build_s = time.perf_counter() - t0
    dpcp = ps.get_data_parallel_group(with_context_parallel=True)
    loader = SyntheticTokens(seed=cfg.seed, vocab=cfg.model.vocab_size, seq_len=t.seq_len,
                             micro_batch=t.micro_batch, global_batch=t.global_batch,
                             dp_rank=layout.dp_rank, dp=layout.dp)
    data = StepBatches(cfg, layout, loader=loader)
    model = chunks if len(chunks) > 1 else chunks[0]
    cp_check = None
    if layout.cp > 1 and not a.no_cp_check:   # the trainer's startup check, recorded, not fatal
        from mdn_scale.train.cp_check import check_run

        cp_check = check_run(cfg, layout, model, raise_on_failure=False)
        if layout.is_logger:
            print(f"[cp-check] {'passed' if cp_check['passed'] else 'FAILED'}: worst relative "
                  f"gradient error {cp_check['world_worst_error']:.2e} (bound {cp_check['tolerance']:g})",
                  flush=True)
    backend = MegatronBackend(cfg, layout, model, dpcp, resume_from=None, log=print)
    params = count_params(owner, layout.device)
    for m in chunks:
        m.train()

    cuda = layout.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step_ms, losses, grad_norms, applied_all, warm_losses, first_step_s = [], [], [], [], [], None

    def one_step(microbatches):
        from torch.profiler import record_function  # ranges in the --profile tables

        with record_function("bench.forward_backward"):
            loss = backend.forward_backward(microbatches, count_tokens(microbatches, dpcp, layout.device))
        with record_function("bench.grad_norm_clip_adamw"):
            return (loss, *backend.step(loss))

    for i in range(a.warmup + a.steps):
        microbatches = data.next_step()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        w0 = time.perf_counter()
        loss, gnorm, applied = one_step(microbatches)
        if cuda:
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end)
        else:
            ms = (time.perf_counter() - w0) * 1e3
        if i == 0:
            first_step_s = time.perf_counter() - w0
        if i < a.warmup:
            warm_losses.append(loss)
            continue
        step_ms.append(ms)
        losses.append(loss)
        grad_norms.append(gnorm)
        applied_all.append(applied)
        if layout.is_logger:
            print(f"step {i + 1 - a.warmup}/{a.steps}: {ms:.1f} ms loss {loss:.5f}", flush=True)

    # per-rank figures to rank 0: step time (the slowest rank's median counts) and peak memory
    mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    profile = profile_run(a, layout, cuda, one_step, data) if a.profile else None
    if a.cprofile:
        cprofile_run(a, layout, cuda, one_step, data)
    syncs = sync_report_run(a, layout, one_step, data) if a.sync_report else None
    med = statistics.median(step_ms)
    per_rank = gather_per_rank([med, mem], layout)

    if layout.is_logger:
        st = stats.model_stats(cfg.model, t.seq_len, 1)
        f_train = float(st["flops_per_token_train"])
        f_6n = 6.0 * st["params_non_embedding"]
        step_s = max(r[0] for r in per_rank) / 1e3
        tokens_per_step = t.global_batch * t.seq_len
        tps = tokens_per_step / step_s
        tps_gpu = tps / layout.world
        peak = a.peak_tflops * 1e12
        card = torch.cuda.get_device_name() if cuda else "cpu (--cpu-smoke: numbers mean nothing)"
        record = {
            "benchmark": "whole-model training step (tools/bench_model.py)",
            "card": card,
            "num_gpus": layout.world if cuda else 0,
            "world": layout.world,
            **versions(extra),
            "command": (f"torchrun --nproc-per-node {layout.world} " if "TORCHELASTIC_RUN_ID" in os.environ
                        else "python ") + " ".join(sys.argv),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": os.path.relpath(a.config, ROOT) if a.config.startswith(ROOT) else a.config,
            "overrides": list(a.overrides),
            "mixer": a.mixer or cfg.model.mixer,
            "model": cfg.model.to_dict(),
            "layout": {"tp": layout.tp, "cp": layout.cp, "pp": layout.pp, "vp": a.vp, "dp": layout.dp,
                       "sp": cfg.parallel.sequence_parallel,
                       "distributed_optimizer": cfg.parallel.distributed_optimizer,
                       "schedule": ("interleaved 1F1B" if a.vp > 1 else "1F1B") if a.pp > 1 else None},
            "seq_len": t.seq_len, "tokens_per_rank_per_sequence": t.seq_len // layout.cp,
            "micro_batch": t.micro_batch, "microbatches_per_rank": a.microbatches,
            "global_batch": t.global_batch, "tokens_per_step": tokens_per_step,
            "precision": t.precision + (" autocast, fp32 weights" if t.precision == "bf16" else ""),
            "recompute": t.recompute, "recompute_offload": t.recompute_offload,
            "backend": cfg.model.backend, "seed": cfg.seed,
            "warmup_steps": a.warmup, "timed_steps": a.steps,
            "timing": "CUDA events around each whole optimizer step (MegatronBackend.forward_backward + step, as the trainer's loop); median of "
                      "the timed steps; the slowest rank's median" if cuda else "wall clock (CPU)",
            "build_s": build_s, "first_step_s": first_step_s,
            "step_ms": step_ms, "step_ms_median": step_s * 1e3,
            "step_ms_mean": statistics.fmean(step_ms),
            "step_ms_median_per_rank": [r[0] for r in per_rank],
            "tokens_per_s": tps, "tokens_per_s_per_gpu": tps_gpu,
            "params_counted": params, "params_stats": st["params_total"],
            "params_non_embedding": st["params_non_embedding"],
            "flops_per_token_train": f_train,
            "flops_per_token_forward": st["flops_per_token_forward"],
            "flops_note": ("megatron_gdn counted as our gdn layer of the same sizes (its in-projection "
                           "has 2 gate rows per head, ours 3)") if a.mixer == "megatron_gdn" else None,
            "mfu_definition": MFU_DEFINITION,
            "peak_tflops": a.peak_tflops,
            "mfu": tps_gpu * f_train / peak,
            "mfu_6n": tps_gpu * f_6n / peak,
            "peak_memory_gib": max(r[1] for r in per_rank) if cuda else None,
            "peak_memory_gib_per_rank": [r[1] for r in per_rank] if cuda else None,
            "losses": losses, "warmup_losses": warm_losses, "grad_norms": grad_norms,
            "all_steps_applied": all(applied_all),
            "cp_check": cp_check,
            "profile": profile,
            "sync_report": syncs,
        }
        os.makedirs(os.path.dirname(os.path.abspath(a.out)) or ".", exist_ok=True)
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=2)
        os.replace(tmp, a.out)
        print(f"{record['mixer']} tp{layout.tp} cp{layout.cp} pp{layout.pp} vp{a.vp} dp{layout.dp} "
              f"seq {t.seq_len}: step {step_s * 1e3:.1f} ms, {tps_gpu:,.0f} tok/s/GPU, "
              f"MFU {100 * record['mfu']:.1f}%, peak {record['peak_memory_gib'] or 0:.1f} GiB "
              f"-> {a.out}", flush=True)
    dist.barrier()
    shutdown()


if __name__ == "__main__":
    main()
