"""AdamW on CUDA: the multi-tensor (foreach) path the trainer uses on GPUs gives the same
parameters bit for bit as the per-parameter loop (the CPU path), at the trainer's settings
(decay and no-decay groups, eps 1e-15, Megatron's schedule)."""
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_foreach_equals_loop_on_cuda():
    from mdn_scale.train.config import TrainConfig
    from mdn_scale.train.optimizer import build_optimizer, build_scheduler, use_foreach

    t = TrainConfig(steps=10, lr=3e-4, warmup_steps=2, weight_decay=0.1, adam_eps=1e-15)

    def run(foreach):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(1024, 2730), torch.nn.LayerNorm(2730),
                                torch.nn.Linear(2730, 1000)).cuda()
        m[1].weight._no_weight_decay = True
        if foreach is None:
            assert use_foreach(m)
        opt = build_optimizer(m, t, foreach=foreach)
        sched = build_scheduler(opt, t)
        g = torch.Generator(device="cuda").manual_seed(7)
        for _ in range(5):
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=g, device="cuda") * 1e-2
            sched.step(1)
            opt.step()
        return opt.defaults["foreach"], [p.detach().clone() for p in m.parameters()]

    f_default, default = run(None)
    f_loop, loop = run(False)
    assert f_default is True and f_loop is False
    for a, b in zip(default, loop):
        assert torch.equal(a, b)
