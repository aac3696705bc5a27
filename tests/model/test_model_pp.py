"""What a pipeline stage sends against what the next one receives into (the PP = 2 hang of
sessions 6 and 7: Megatron's schedule receives into buffers of config.pipeline_dtype while a
stage sends its output as it is; a dtype mismatch is a byte-count mismatch NCCL never finishes).
A first stage (embedding and two MDN layers, no head) on CPU, one gloo process, under bf16
autocast over fp32 weights and in fp32: its output dtype must be
mdn_scale.train.step.pipeline_dtype's. Megatron's schedules themselves (1F1B, interleaved) on two
gloo processes with their 'cuda' buffers mapped to the CPU (model_workers._megatron_schedules_on_cpu)
against PP = 1; in bf16 on the GPU: tests/gpu/test_train_gpu.py and the suite's PP jobs."""
import pytest
import torch
from model_dist import run_jobs

import model_workers as workers

CFG = dict(hidden_size=32, num_layers=2, num_heads=2, head_k_dim=8, vocab_size=61,
           vocab_pad_multiple=8, seq_len=48, ffn_hidden_size=64, chunk_size=8)


def test_first_stage_sends_what_the_next_receives():
    (res,), = run_jobs(1, [(workers.stage_output_dtype_worker, (CFG,))])
    for precision, want in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        sent, shape, received = res[precision]
        assert shape == (48, 1, 32), shape           # [S, B, d]: the hidden states, not logits
        assert sent == received == want, (precision, sent, received)


def _microbatches(n, B=2, T=24, vocab=61):
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(n):
        t = torch.randint(0, vocab, (B, T + 1), generator=g)
        out.append({"tokens": t[:, :-1], "labels": t[:, 1:], "loss_mask": torch.ones(B, T),
                    "cu_seqlens": torch.arange(0, B * T + 1, T, dtype=torch.int32)})
    return out


def test_schedules_match_pp1():
    """Megatron's 1F1B and interleaved schedules (PP = 2, VP = 1 and 2) run by
    mdn_scale.train.step.forward_backward on two gloo processes give PP = 1's loss and
    gradients (float64 weights). The interleaved case on two stages
    paired one rank's gradient with the other's activation receive while its p2p was batched
    (step.batch_p2p_comm): the 1.3B losses were off from the third micro-batch on two H200s
    (session 17, plan s17x2c)."""
    cfg = dict(CFG, num_layers=8)
    mbs = _microbatches(8)
    (ref,), = run_jobs(1, [(workers.schedule_worker, (cfg, 1, 1, mbs))])
    runs = run_jobs(2, [(workers.schedule_worker, (cfg, 2, vp, mbs)) for vp in (1, 2)])
    for vp, ranks in zip((1, 2), runs):
        for r in ranks:   # every rank returns the pipeline group's loss
            assert r["loss"] == pytest.approx(ref["loss"], rel=1e-6), (vp, r["loss"], ref["loss"])
        grads = {}
        for r in ranks:
            grads.update(r["grads"])
        assert grads.keys() == ref["grads"].keys(), vp
        for k, g in ref["grads"].items():
            torch.testing.assert_close(grads[k], g, rtol=1e-6, atol=1e-9,
                                       msg=lambda m, k=k, vp=vp: f"vp {vp} {k}: {m}")


def test_evaluate_under_pipeline_matches_pp1():
    """Validation under PP (the trainer's eval.interval with parallel.pipeline > 1): the batches
    run through Megatron's forward-only schedule, 1F1B and interleaved on two gloo processes;
    every stage returns PP = 1's token-weighted mean loss, with some tokens masked out, leaves
    no gradients and the chunks in training mode."""
    cfg = dict(CFG, num_layers=4)
    batches = _microbatches(4)
    batches[1]["loss_mask"][0, :10] = 0          # the mean is over loss tokens, not all tokens
    (ref,), = run_jobs(1, [(workers.evaluate_worker, (cfg, 1, 1, batches))])
    runs = run_jobs(2, [(workers.evaluate_worker, (cfg, 2, vp, batches)) for vp in (1, 2)])
    for vp, ranks in zip((1, 2), runs):
        for r in ranks:
            assert r["val"] == pytest.approx(ref["val"], rel=1e-6), (vp, r["val"], ref["val"])
            assert all(r["training"]) and all(r["grads"]), vp
