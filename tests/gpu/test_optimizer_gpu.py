"""AdamW on CUDA: the multi-tensor (foreach) path the trainer uses on GPUs makes the same updates
as the per-parameter loop (the CPU path), at the trainer's settings (decay and no-decay groups,
eps 1e-15, Megatron's schedule), to float32 rounding. Not bit for bit: on an H100 (torch 2.11,
2026-11-27) the foreach kernels round differently from the per-tensor ones (this test first
asserted bitwise equality and failed there), so the bound is relative to the size of the
updates: a wrong group, decay or bias correction moves parameters by a fraction of an update,
orders of magnitude above it."""
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
        init = [p.detach().clone() for p in m.parameters()]
        opt = build_optimizer(m, t, foreach=foreach)
        sched = build_scheduler(opt, t)
        g = torch.Generator(device="cuda").manual_seed(7)
        for _ in range(5):
            for p in m.parameters():
                p.grad = torch.randn(p.shape, generator=g, device="cuda") * 1e-2
            sched.step(1)
            opt.step()
        return opt.defaults["foreach"], [p.detach().clone() for p in m.parameters()], init

    f_default, default, init = run(None)
    f_loop, loop, init_loop = run(False)
    assert f_default is True and f_loop is False
    for a, b, a0, b0 in zip(default, loop, init, init_loop):
        assert torch.equal(a0, b0)
        moved = (b - b0).abs().max().item()
        diff = (a - b).abs().max().item()
        ulp = torch.finfo(torch.float32).eps * b.abs().max().item()
        print(f"{tuple(a.shape)}: update {moved:.3e}, foreach - loop {diff:.3e} ({diff / ulp:.1f} ulp)")
        assert moved > 0
        assert diff <= 1e-4 * moved + 8 * ulp, (diff, moved, ulp)
