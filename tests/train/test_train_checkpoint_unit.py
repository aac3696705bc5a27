"""Checkpoint details in one process (no process group): shape mismatches named, pickled code in
a DCP index refused, keep-last pruning, unfinished saves ignored, SIGTERM/SIGUSR1 caught."""

import json
import os
import pickle
import signal

import pytest
import torch

from mdn_scale.train import checkpoint as ckpt


def save(directory, model, step, keep_last=0):
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return ckpt.save(str(directory), step=step, model=model, optimizer=opt, scheduler=None,
                     extra={"rng": ckpt.rng_state()}, meta={"consumed_tokens": 0}, keep_last=keep_last)


def test_round_trip_and_shape_mismatch_named(tmp_path):
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    save(tmp_path, a, 1)
    path, meta = ckpt.find_loadable(str(tmp_path))
    b = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    extra = ckpt.load(path, meta, model=b)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    import random

    import numpy as np

    ckpt.set_rng_state(extra["rng"])  # the saved RNG state, read back with weights_only=True,
    first = (torch.rand(3), random.random(), np.random.rand())
    ckpt.set_rng_state(extra["rng"])  # restores every generator: the same draws again
    assert (torch.rand(3), random.random(), np.random.rand())[1:] == first[1:]
    ckpt.set_rng_state(extra["rng"])
    assert torch.equal(torch.rand(3), first[0])
    wrong = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2))
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load(path, meta, model=wrong)
    msg = str(e.value)
    assert "model/0.weight: checkpoint has shape (3, 4), the model (5, 4)" in msg
    assert "model/1.weight: checkpoint has shape (2, 3), the model (2, 5)" in msg


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickled_code_in_the_index_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = torch.nn.Linear(2, 2)
    path = save(tmp_path / "ck", m, 1)
    with open(os.path.join(path, ".metadata"), "wb") as f:
        pickle.dump(_Evil(), f)
    meta = json.load(open(os.path.join(path, "meta.json")))
    with pytest.raises(ckpt.CheckpointError, match="system"):
        ckpt.load(path, meta, model=m)
    assert not os.path.exists(tmp_path / "PWNED")


def test_keep_last_latest_pointer_and_unfinished_saves(tmp_path, capsys):
    m = torch.nn.Linear(2, 2)
    for step in (1, 2, 3):
        save(tmp_path, m, step, keep_last=2)
    assert ckpt.list_checkpoints(str(tmp_path)) == [2, 3]
    assert open(tmp_path / "latest").read().strip() == "step_00000003"
    (tmp_path / "step_00000004.tmp").mkdir()          # a save that died before its rename
    (tmp_path / "step_00000005").mkdir()              # a folder without meta.json
    path, meta = ckpt.find_loadable(str(tmp_path))
    assert path.endswith("step_00000003") and meta["step"] == 3
    assert "step_00000005: no meta.json" in capsys.readouterr().out
    # a truncated shard file: size differs from the record
    shard = next(p for p in os.listdir(path) if p.endswith(".distcp"))
    with open(os.path.join(path, shard), "r+b") as f:
        f.truncate(3)
    path, _ = ckpt.find_loadable(str(tmp_path))
    assert path.endswith("step_00000002")
    assert f"file {shard} has 3 bytes" in capsys.readouterr().out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_flag_catches_the_signal(signum):
    from mdn_scale.train.trainer import StopFlag

    flag = StopFlag()
    try:
        assert not flag.agreed(torch.device("cpu"))
        os.kill(os.getpid(), signum)
        assert flag.signum == signum and flag.agreed(torch.device("cpu"))
    finally:
        flag.restore()
    assert signal.getsignal(signum) is not flag._handle
