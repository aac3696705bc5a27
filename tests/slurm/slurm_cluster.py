"""A throw-away one-node SLURM cluster for tests: munged, slurmctld and slurmd (Debian's slurm-wlm
and munge) run as root from a temporary folder with their own config, state, spool, logs, sockets
and free ports, so they never touch /etc/slurm or another cluster on the machine. Settings that
work in a container without systemd or cgroup control (DESIGN.md §9): ProctrackType=
proctrack/linuxproc, TaskPlugin=task/none, the node's size from nproc and /proc/meminfo.

    with SlurmCluster(tmp_dir) as c:
        job = c.sbatch(["--ntasks=1", "script.sh"])     # the env of c.env (SLURM_CONF) is used
        c.wait_state(job, {"COMPLETED"})

`python tests/slurm/slurm_cluster.py DIR` starts one and keeps it up until Ctrl-C (for trying the
scripts in launch/slurm/ by hand: `export SLURM_CONF=DIR/slurm.conf`).

Stopping kills exactly the daemons this object started, by process id (other clusters and
agents may share the machine), then any job processes still alive under our spool.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

DAEMONS = ("munged", "slurmctld", "slurmd")


def missing_programs() -> list[str]:
    """Programs the cluster needs that are not on PATH (tools/ci_setup_slurm.sh installs them)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    need = list(DAEMONS) + ["sbatch", "scontrol", "squeue", "srun", "scancel"]
    return [p for p in need if shutil.which(p, path=path) is None]


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _real_memory_mb() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024 * 9 // 10  # leave slurmd's check some slack
    raise RuntimeError("MemTotal not found in /proc/meminfo")


class SlurmCluster:
    def __init__(self, root: str, *, cpus: int | None = None):
        self.root = os.path.abspath(root)
        self.cpus = cpus or os.cpu_count() or 1
        self.node = socket.gethostname().split(".")[0]
        self.conf = os.path.join(self.root, "slurm.conf")
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        self.env["PATH"] = self.env.get("PATH", "") + ":/usr/sbin:/sbin"

    # -- life cycle ---------------------------------------------------------------------------
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def _path(self, *parts) -> str:
        return os.path.join(self.root, *parts)

    def _write_config(self) -> None:
        ctld_port, slurmd_port = _free_ports(2)
        r = self._path
        text = f"""\
ClusterName=mdntest{ctld_port}
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r("munge", "munge.sock")},cred_expire=10
StateSaveLocation={r("state")}
SlurmdSpoolDir={r("spool", "slurmd.%n")}
SlurmctldPidFile={r("run", "slurmctld.pid")}
SlurmdPidFile={r("run", "slurmd.%n.pid")}
SlurmctldLogFile={r("log", "slurmctld.log")}
SlurmdLogFile={r("log", "slurmd.%n.log")}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=300
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_real_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
        with open(self.conf, "w") as f:
            f.write(text)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self._path("log", f"{name}.stdout"), "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True)
        log.close()

    def start(self, timeout: float = 60) -> None:
        for d in ("munge", "state", "spool", "run", "log"):
            os.makedirs(self._path(d), exist_ok=True)
        os.chmod(self._path("munge"), 0o700)
        self._write_config()
        key = self._path("munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        self._spawn("munged", ["munged", "--foreground", "--force",
                               f"--socket={self._path('munge', 'munge.sock')}",
                               f"--key-file={key}", f"--pid-file={self._path('run', 'munged.pid')}",
                               f"--log-file={self._path('log', 'munged.log')}",
                               f"--seed-file={self._path('munge', 'munged.seed')}"])
        self._wait_for(lambda: os.path.exists(self._path("munge", "munge.sock")), 20, "munged")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", self.conf])
        self._spawn("slurmd", ["slurmd", "-D", "-f", self.conf, "-N", self.node])
        self._wait_for(self._node_idle, timeout, "slurmd to register as idle")

    def _node_idle(self) -> bool:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True,
                           text=True)
        return r.returncode == 0 and r.stdout.strip() == "idle"

    def _wait_for(self, ok, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}:\n{self.logs()}")
            if ok():
                return
            time.sleep(0.3)
        raise TimeoutError(f"waiting for {what} timed out after {timeout}s:\n{self.logs()}")

    def logs(self, tail: int = 4000) -> str:
        out = []
        for name in sorted(os.listdir(self._path("log"))):
            with open(self._path("log", name), errors="replace") as f:
                out.append(f"--- {name}\n{f.read()[-tail:]}")
        return "\n".join(out)

    def stop(self) -> None:
        """Cancel jobs, then end the daemons we started (by pid, slurmd first so it can end its
        steps), then any job process left behind under our spool directory."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--user=root", "--full"])
            deadline = time.time() + 20
            while time.time() < deadline and self.run(["squeue", "-h"]).stdout.strip():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for pid in self._leftover_job_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _leftover_job_pids(self) -> list[int]:
        """Processes of this cluster's jobs: slurmstepd and the job's tasks, recognised by
        SLURM_CONF naming our config together with a SLURM_JOB_ID (clients such as sbatch, or
        the process that started the cluster, have no job id)."""
        ours = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == os.getpid():
                continue
            try:
                with open(f"/proc/{d}/environ", "rb") as f:
                    env = f.read().split(b"\0")
                with open(f"/proc/{d}/comm", "rb") as f:
                    comm = f.read().strip()
            except OSError:
                continue
            if ours in env and (comm == b"slurmstepd" or any(e.startswith(b"SLURM_JOB_ID=") for e in env)):
                pids.append(int(d))
        return pids

    # -- jobs ---------------------------------------------------------------------------------
    def run(self, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True,
                              **kw)

    def sbatch(self, args: list[str], cwd: str | None = None, env: dict | None = None) -> int:
        r = self.run(["sbatch", "--parsable", *args], cwd=cwd, env=env or self.env)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch failed: {r.stderr}\n{self.logs()}")
        return int(r.stdout.strip().split(";")[0])

    def job_info(self, job: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ...); {} once the job is gone."""
        r = self.run(["scontrol", "show", "job", "-o", str(job)])
        if r.returncode != 0:
            return {}
        info = {}
        for field in r.stdout.split():
            key, _, value = field.partition("=")
            info.setdefault(key, value)
        return info

    def wait_state(self, job: int, states: set[str], timeout: float = 180) -> dict[str, str]:
        deadline = time.time() + timeout
        info = {}
        while time.time() < deadline:
            info = self.job_info(job)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job} not in {states} after {timeout}s: {info}\n{self.logs()}")


if __name__ == "__main__":
    import sys

    def _stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    with SlurmCluster(sys.argv[1]) as c:
        print(f"cluster up: export SLURM_CONF={c.conf}   (Ctrl-C or SIGTERM stops it)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
