"""Learning-rate schedules (warmup, cosine, WSD) and the no-weight-decay groups."""

import math

import pytest
import torch

from mdn_scale.train.config import TrainConfig
from mdn_scale.train.optimizer import build_optimizer, build_scheduler, param_groups


def lrs(t: TrainConfig) -> list[float]:
    """The lr each step 1..steps trains with (the loop calls scheduler.step(1) before each update)."""
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, t)
    sched = build_scheduler(opt, t)
    out = []
    for _ in range(t.steps):
        sched.step(1)
        out.append(opt.param_groups[0]["lr"])
    return out


def test_warmup_then_cosine_to_min():
    t = TrainConfig(steps=20, lr=1.0, min_lr_ratio=0.1, warmup_steps=4, decay="cosine")
    got = lrs(t)
    assert got[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    for s in range(5, 21):  # cosine from lr at step 4 to lr·min_lr_ratio at the last step
        frac = (s - 4) / 16
        assert got[s - 1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
    assert got[-1] == pytest.approx(0.1)


def test_wsd_holds_then_decays_linearly():
    t = TrainConfig(steps=20, lr=1.0, min_lr_ratio=0.0, warmup_steps=2, decay="wsd",
                    wsd_decay_fraction=0.25)
    got = lrs(t)
    assert got[:2] == pytest.approx([0.5, 1.0])
    # 18 post-warmup steps; the last round(0.25·18) = 4 decay linearly to 0
    assert got[2:16] == pytest.approx([1.0] * 14)
    assert got[16:] == pytest.approx([0.75, 0.5, 0.25, 0.0])


def test_no_weight_decay_groups():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)  # weight: decay; bias: none
            self.norm = torch.nn.LayerNorm(4)  # 1-D: none
            self.gate = torch.nn.Parameter(torch.zeros(2, 2))
            self.gate._no_weight_decay = True  # flagged by the model (MDN's A_log, dt_bias ...)

    m = M()
    decay, no_decay = param_groups(m)
    assert [id(p) for p in decay["params"]] == [id(m.proj.weight)]
    assert {id(p) for p in no_decay["params"]} == {id(m.proj.bias), id(m.norm.weight),
                                                   id(m.norm.bias), id(m.gate)}
    t = TrainConfig(steps=5, weight_decay=0.1)
    opt = build_optimizer(m, t)
    build_scheduler(opt, t).step(1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def _adamw_run(model, t, foreach, steps=4):
    opt = build_optimizer(model, t, foreach=foreach)
    sched = build_scheduler(opt, t)
    g = torch.Generator().manual_seed(7)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) * 1e-2
        sched.step(1)
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt


def test_foreach_default_cpu_loop_and_same_updates():
    """CPU keeps the per-parameter loop (foreach=False, fused=False); the multi-tensor foreach
    path gives the same parameters bit for bit here (CUDA's default, fused AdamW, is compared
    with the loop to rounding by tests/gpu/test_optimizer_gpu.py)."""
    from mdn_scale.train.optimizer import use_fused

    t = TrainConfig(steps=10, lr=1e-2, warmup_steps=2, weight_decay=0.1, adam_eps=1e-15)

    def model():
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))
        m[0].weight._no_weight_decay = True
        return m

    m = model()
    assert not use_fused(m)
    assert build_optimizer(m, t).defaults["foreach"] is False
    assert build_optimizer(m, t).defaults["fused"] is False
    with pytest.raises(ValueError, match="exclusive"):
        build_optimizer(m, t, foreach=True, fused=True)
    loop, _ = _adamw_run(model(), t, None)
    multi, opt = _adamw_run(model(), t, True)
    assert opt.defaults["foreach"] is True and opt.defaults["fused"] is False
    for a, b in zip(loop, multi):
        assert torch.equal(a, b)
