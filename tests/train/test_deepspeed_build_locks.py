"""A build lock left by a killed process must not hang the next DeepSpeed run (it hung CI stop 23
for 90 minutes in ``deepspeed.initialize``): an old lock is named and removed, a fresh one (a
build in progress on this node) is left for torch to wait on."""

import os
import time

from mdn_scale.train.deepspeed_backend import CPU_ADAM_OP, SHM_COMM_OP, STALE_LOCK_S, clear_stale_build_locks


def _lock(root, name):
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "lock").write_bytes(b"")
    return d / "lock"


def test_only_old_locks_are_removed_and_named(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    names = [SHM_COMM_OP, CPU_ADAM_OP]
    stale, fresh = _lock(tmp_path, names[0]), _lock(tmp_path, names[1])
    old = time.time() - STALE_LOCK_S - 5
    os.utime(stale, (old, old))
    said = []
    assert clear_stale_build_locks(names, said.append) == [str(stale)]
    assert not stale.exists() and fresh.exists()
    assert len(said) == 1 and str(stale) in said[0] and "stale" in said[0]
    # a second pass (another rank of the node) finds nothing to remove and says nothing
    assert clear_stale_build_locks(names, said.append) == [] and len(said) == 1
