"""What a pipeline stage sends against what the next one receives into (the PP = 2 hang of
sessions 6 and 7: Megatron's schedule receives into buffers of config.pipeline_dtype while a
stage sends its output as it is; a dtype mismatch is a byte-count mismatch NCCL never finishes).
A first stage (embedding and two MDN layers, no head) on CPU, one gloo process, under bf16
autocast over fp32 weights and in fp32: its output dtype must be
mdn_scale.train.step.pipeline_dtype's. (The schedules themselves run only on the GPU:
tests/gpu/test_train_gpu.py and the suite's PP jobs.)"""
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
