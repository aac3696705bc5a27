"""launch/slurm/ on a real SLURM (one node, started by the test; see slurm_cluster.py) and on
two "nodes" of one machine. The tiny model on CPU with gloo, two training processes, real
shards, real signals:

1. launch/slurm/submit.sh --chain 2 (pretrain.sbatch): SIGUSR1 to the job's steps (what SLURM
   sends before the time limit with --signal=USR1@N); the trainer saves and exits 0, the job
   requeues itself (same id, Restarts=1) and resumes from that checkpoint. Then SIGTERM
   (scancel): it saves again and is not requeued; the chained job starts, resumes from there
   and ends with the losses of an uninterrupted run, step for step, exactly.
2. Two node.sh launchers (torchrun, c10d rendezvous on loopback, one process each); one "node"
   is killed (SIGKILL to its launcher, torchrun and worker); the other's torchrun restarts its
   worker, a replacement node joins, and both go on from the last checkpoint to the same losses.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from slurm_cluster import SlurmCluster, missing_programs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 40
INTERVAL = 5
SIGNAL_AFTER = 7  # logged steps before the signal / the lost node

_missing = missing_programs()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(_missing), reason=f"SLURM is not installed (missing: {', '.join(_missing)}); "
                       "install it with tools/ci_setup_slurm.sh (Debian's slurm-wlm and munge)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the test cluster runs slurmctld and slurmd as root"),
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    import json as json_pkg

    from mdn_scale.data import make_shards

    out = tmp_path_factory.mktemp("shards") / "json_pkg"
    make_shards([os.path.dirname(json_pkg.__file__)], str(out), progress=False)
    return str(out)


def trainer_args(shards, run_dir, *extra):
    return ["--config", os.path.join(ROOT, "configs", "tiny.yaml"),
            f"data.datasets=[{shards}]", f"data.valid_datasets=[{shards}]",
            f"train.steps={STEPS}", "train.seq_len=128", "model.seq_len=128",
            "train.global_batch=4", "train.micro_batch=2", "train.warmup_steps=2",
            "eval.interval=0", "logging.interval=1", f"logging.dir={run_dir}/log",
            f"checkpoint.dir={run_dir}/ckpt", *extra]


def losses(run_dir):
    out = {}
    for line in open(os.path.join(run_dir, "log", "metrics.jsonl")):
        r = json.loads(line)
        if "loss" in r:
            assert r["step"] not in out, f"step {r['step']} logged twice"
            out[r["step"]] = r["loss"]
    return out


def logged_steps(run_dir) -> int:
    path = os.path.join(run_dir, "log", "metrics.jsonl")
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


def complete_checkpoints(run_dir) -> list[int]:
    d = os.path.join(run_dir, "ckpt")
    if not os.path.isdir(d):
        return []
    return sorted(int(n[5:]) for n in os.listdir(d)
                  if n.startswith("step_") and not n.endswith(".tmp")
                  and os.path.exists(os.path.join(d, n, "meta.json")))


def clean_env(**extra) -> dict:
    """This environment without SLURM's variables (the test may itself run inside a job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", **extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """The uninterrupted run: plain torchrun, 2 processes, no checkpoints."""
    run_dir = tmp_path_factory.mktemp("reference")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           os.path.join(ROOT, "launch", "pretrain.py"), *trainer_args(shards, run_dir),
           "checkpoint.interval=0"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=run_dir, env=clean_env(), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ref = losses(run_dir)
    assert sorted(ref) == list(range(1, STEPS + 1))
    return ref


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(str(tmp_path_factory.mktemp("slurm")))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def wait_until(ok, timeout, what, on_timeout=lambda: ""):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if ok():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{on_timeout()}")


def read(path) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def stop_steps(log_text: str, signum: int) -> list[int]:
    """Steps at which the trainer said it stopped on `signum` ("stopping at step S on signal N")."""
    return [int(line.split()[3]) for line in log_text.splitlines()
            if line.startswith("stopping at step") and line.split()[-1] == str(signum)]


def test_sbatch_usr1_requeue_sigterm_chain(cluster, shards, reference, tmp_path):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    env = dict(cluster.env, **clean_env(), SLURM_CONF=cluster.conf, MDN_ROOT=ROOT,
               MDN_LOG_ROOT=str(logs), CPU_PROCS_PER_NODE="2")
    # Two chained jobs (launch/slurm/submit.sh). The script's #SBATCH defaults are for GPU
    # nodes; the command line overrides them.
    r = subprocess.run([os.path.join(ROOT, "launch", "slurm", "submit.sh"), "--chain", "2",
                        "--nodes=1", "--gpus-per-node=0", f"--cpus-per-task={cluster.cpus}",
                        "--time=30", f"--output={tmp_path}/batch-%j.out", "--",
                        *trainer_args(shards, run_dir, f"checkpoint.interval={INTERVAL}",
                                      "checkpoint.keep_last=20")],
                       cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr + cluster.logs()
    job, chained = (int(x) for x in r.stdout.split())
    job_logs = logs / f"mdn-pretrain-{job}"
    chained_logs = logs / f"mdn-pretrain-{chained}"

    def dump():
        parts = [cluster.logs()]
        for p in [*sorted(tmp_path.glob("batch-*.out")), *sorted(logs.glob("*/*.log"))]:
            parts.append(f"--- {p.parent.name}/{p.name}\n{read(p)[-3000:]}")
        return "\n".join(parts)

    # 1. The time-limit warning: what SLURM does at --signal=USR1@N is signal every process of
    #    the job's steps; scancel --signal does the same now. Save, exit 0, requeue, resume.
    wait_until(lambda: logged_steps(run_dir) >= SIGNAL_AFTER, 240, f"{SIGNAL_AFTER} steps", dump)
    r = cluster.run(["scancel", "--signal=USR1", str(job)])
    assert r.returncode == 0, r.stderr
    attempt1 = job_logs / "attempt-1-node-0.log"
    wait_until(lambda: attempt1.exists() and "resumed from" in read(attempt1), 240,
               "the requeued job to resume", dump)
    node0 = read(job_logs / "attempt-0-node-0.log")
    assert "got SIGUSR1" in node0, dump()
    (s,) = stop_steps(node0, signal.SIGUSR1)
    assert SIGNAL_AFTER <= s < STEPS, dump()
    assert s in complete_checkpoints(run_dir)
    assert f"unfinished at checkpoint step {s}: requeueing job {job}" in read(tmp_path / f"batch-{job}.out")
    assert f"resumed from {run_dir}/ckpt/step_{s:08d} at step {s}" in read(attempt1), dump()

    # 2. scancel (SIGTERM, as at the time limit or on preemption) of the resumed job: save, no
    #    requeue; the chained job starts after it and finishes the run from that checkpoint.
    wait_until(lambda: logged_steps(run_dir) >= s + 2, 120, "steps after the resume", dump)
    r = cluster.run(["scancel", str(job)])
    assert r.returncode == 0, r.stderr
    info = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=120)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "1", f"{info}\n{dump()}"
    info = cluster.wait_state(chained, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=300)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{dump()}"

    (t,) = stop_steps(read(attempt1), signal.SIGTERM)
    assert s < t < STEPS and t in complete_checkpoints(run_dir), dump()
    batch = read(tmp_path / f"batch-{job}.out")
    assert f"stopped by SIGTERM at checkpoint step {t}: not requeueing" in batch, dump()
    chained_node = read(chained_logs / "attempt-0-node-0.log")
    assert f"resumed from {run_dir}/ckpt/step_{t:08d} at step {t}" in chained_node, dump()
    assert "run finished" in read(tmp_path / f"batch-{chained}.out"), dump()
    for d, attempts in ((job_logs, 2), (chained_logs, 1)):
        assert sorted(p.name for p in d.glob("*.env")) == [f"attempt-{a}.env" for a in range(attempts)]

    # 3. Step for step, exactly the uninterrupted run's losses.
    assert losses(run_dir) == reference


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def training_processes(launcher_pid: int) -> list[int]:
    """The pretrain.py workers under a node.sh (not torchrun, whose command line names it too)."""
    out = []
    for pid in descendants(launcher_pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"launch/pretrain.py") for a in argv) and b"torch.distributed.run" not in argv:
            out.append(pid)
    return out


def test_lost_node_restarts_from_last_checkpoint(shards, reference, tmp_path):
    run_dir = tmp_path / "run"
    env = clean_env(NNODES="2", RDZV_HOST="127.0.0.1", RDZV_PORT=str(free_port()),
                    RDZV_ID="lost-node-test", NPROC_PER_NODE="1", MAX_RESTARTS="1")
    node_sh = os.path.join(ROOT, "launch", "slurm", "node.sh")
    args = trainer_args(shards, run_dir, f"checkpoint.interval={INTERVAL}", "checkpoint.keep_last=10")
    procs = []

    def start_node(rank, name):
        log = open(tmp_path / f"{name}.log", "w")
        p = subprocess.Popen([node_sh, *args], env=dict(env, NODE_RANK=str(rank)), cwd=tmp_path,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        procs.append(p)
        return p

    def dump():
        return "\n".join(f"--- {p.name}\n{read(p)[-4000:]}" for p in sorted(tmp_path.glob("*.log")))

    try:
        node0 = start_node(0, "node0")
        node1 = start_node(1, "node1")
        wait_until(lambda: logged_steps(run_dir) >= SIGNAL_AFTER and complete_checkpoints(run_dir),
                   240, "steps and a checkpoint", dump)
        survivors = training_processes(node0.pid)
        assert survivors, dump()
        for pid in descendants(node1.pid):  # the node is gone: launcher, torchrun, worker
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        node1.wait(timeout=30)
        # Once node 0's worker has died of the lost peer, no save can complete any more.
        wait_until(lambda: not any(alive(p) for p in survivors), 120, "node 0's worker to fail", dump)
        last = complete_checkpoints(run_dir)[-1]
        lost_at = logged_steps(run_dir)

        replacement = start_node(1, "node1-replacement")
        assert node0.wait(timeout=300) == 0, dump()
        assert replacement.wait(timeout=60) == 0, dump()
    finally:
        for p in procs:
            if p.poll() is None:
                for pid in descendants(p.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                p.wait()

    log0 = read(tmp_path / "node0.log")
    assert f"resumed from {run_dir}/ckpt/step_{last:08d} at step {last}" in log0, dump()
    assert last <= lost_at < STEPS
    assert losses(run_dir) == reference
