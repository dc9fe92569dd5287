"""A real one-node Slurm cluster on localhost for the tests: the `slurm_cluster` fixture.

The fixture installs Slurm and MUNGE with apt-get when `sbatch` or a daemon is missing (root
only), then starts its own munged, slurmctld and slurmd from a temporary folder: its own
slurm.conf (found through SLURM_CONF, never /etc/slurm), MUNGE key and socket, free ports,
state, spool and logs. It stops exactly the daemons it started, by pid, and removes the folder.

Accounting: no slurmdbd, so `sacct` does not work here (AccountingStorageType=none). Tests
read job states with `squeue` and `scontrol show job` (finished jobs stay listed for MinJobAge
seconds); jobcomp/filetxt keeps one line per finished or requeued run in jobcomp.txt, for
reading after a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

PACKAGES = ("slurm-wlm", "munge")
# every program the fixture or the tests run
PROGRAMS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "slurmctld", "slurmd", "munged")
SBIN = "/usr/sbin:/sbin"
NODE = "localhost"


def which(program: str) -> str | None:
    return shutil.which(program, path=os.environ.get("PATH", "") + os.pathsep + SBIN)


def missing_programs() -> list[str]:
    return [p for p in PROGRAMS if which(p) is None]


def ensure_slurm_installed() -> None:
    """Install slurm-wlm and munge with apt-get if a program is missing; else skip the test."""
    missing = missing_programs()
    if not missing:
        return
    why = f"Slurm is not installed (no {', '.join(missing)})"
    if os.geteuid() != 0:
        pytest.skip(f"{why} and installing it needs root: apt-get install {' '.join(PACKAGES)}")
    if which("apt-get") is None:
        pytest.skip(f"{why} and there is no apt-get to install {' '.join(PACKAGES)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *PACKAGES]
    done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:  # a fresh machine may have no package lists yet
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=900)
        done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0 or missing_programs():
        pytest.skip(f"{why}; `{' '.join(install)}` failed:\n{done.stderr[-2000:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_hardware() -> str:
    """CPUs, topology and RealMemory as slurmd itself will report them (else it drains)."""
    done = subprocess.run([which("slurmd"), "-C"], capture_output=True, text=True)
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    found = dict(re.findall(r"(\w+)=(\S+)", done.stdout))
    if done.returncode == 0 and all(k in found for k in ("CPUs", "RealMemory")):
        return " ".join(f"{k}={found[k]}" for k in keys if k in found)
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return f"CPUs={os.cpu_count()} RealMemory={memory_mb * 9 // 10}"


def parse_records(text: str) -> list[dict[str, str]]:
    """`scontrol show job -o` lines (one per job or array task) -> key/value dicts."""
    return [dict(re.findall(r"(\w[\w/:]*)=(\S*)", line)) for line in text.splitlines() if line]


class SlurmCluster:
    """munged + slurmctld + slurmd for one node, all under `root`."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.logs = root / "log"
        self.munge_socket = root / "munge" / "munge.socket"
        self.processes: dict[str, subprocess.Popen] = {}
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
        # the installed `synthbreast` and `accelerate` first on PATH, inside jobs too (sbatch
        # exports the submitting environment)
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", ""), SBIN])
        env["SLURM_CONF"] = str(self.conf)
        self.env = env

    # --- start and stop
    def start(self, timeout: float = 60) -> None:
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        os.chmod(self.root / "munge", 0o755)  # clients reach the socket; the key stays 0400
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.conf.write_text(self.slurm_conf())
        munge_dir = self.root / "munge"
        self.spawn(
            "munged",
            [
                which("munged"),
                "--foreground",
                "--force",  # the temporary folder's parents are not munged's usual ones
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
                f"--log-file={self.logs / 'munged.log'}",
            ],
        )
        self.wait_for(self.munge_socket.exists, 10, "munged's socket")
        self.spawn("slurmctld", [which("slurmctld"), "-D", "-f", str(self.conf)])
        self.spawn("slurmd", [which("slurmd"), "-D", "-N", NODE, "-f", str(self.conf)])
        self.wait_for(lambda: self.node_state() == "idle", timeout, f"node {NODE} idle in sinfo")

    def slurm_conf(self) -> str:
        root = self.root
        ports = [free_port()]
        while len(ports) < 2:
            ports += [p for p in [free_port()] if p not in ports]
        return f"""\
# written by tests/slurm_cluster.py: one node on localhost, root only, no accounting
ClusterName=synthbreast-test
SlurmctldHost={NODE}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmdPort={ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire is also how long a requeued job waits before it may start again [120 s]
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={self.logs}/slurmctld.log
SlurmdLogFile={self.logs}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups: works in containers and on machines without cgroup delegation
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# look at pending jobs every second, not every minute: tests wait on the scheduler
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.logs}/jobcomp.txt
MinJobAge=900
KillWait=10
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
NodeName={NODE} NodeAddr=127.0.0.1 {node_hardware()} State=UNKNOWN
PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""

    def spawn(self, name: str, command: list[str]) -> None:
        with open(self.logs / f"{name}.out", "wb") as log:
            self.processes[name] = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )

    def stop(self) -> None:
        """Cancel what is left, then end the daemons this object started (by pid)."""
        if "slurmctld" in self.processes:
            self.run_command("scancel", "--user", "root", check=False)
            deadline = time.monotonic() + 20
            while self.run_command("squeue", "-h", check=False).strip():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):  # clients before munged
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=15)

    # --- using the cluster
    def run_command(self, *args: str, check: bool = True, cwd: Path | None = None) -> str:
        done = subprocess.run(
            list(args), capture_output=True, text=True, env=self.env, cwd=cwd, timeout=60
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {done.returncode}: {done.stderr}")
        return done.stdout

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        """Submit; return the job id. `env`: variables added to the cluster's environment."""
        done = subprocess.run(
            ["sbatch", "--parsable", *args],
            capture_output=True,
            text=True,
            env={**self.env, **(env or {})},
            cwd=cwd,
            timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {done.stderr}")
        return done.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job`: one record per job, or per task of an array job."""
        return parse_records(self.run_command("scontrol", "show", "job", "-o", job_id))

    def queued(self, job_id: str) -> bool:
        done = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%i"],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
        )
        if done.returncode != 0 and "Invalid job id" in done.stderr:
            return False  # finished and already purged
        return done.returncode != 0 or bool(done.stdout.strip())

    def wait(self, job_id: str, timeout: float = 120) -> list[dict[str, str]]:
        """Wait until the job (every task of an array) has left the queue; its records."""
        self.wait_for(lambda: not self.queued(job_id), timeout, f"job {job_id} to finish")
        return self.jobs(job_id)

    def node_state(self) -> str:
        out = self.run_command("sinfo", "-h", "-n", NODE, "-o", "%T", check=False)
        return out.strip()

    def wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited {process.returncode}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                queue = self.run_command("squeue", check=False)
                raise TimeoutError(f"waited {timeout} s for {what}\n{queue}\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, lines: int = 15) -> str:
        parts = []
        for path in sorted(self.logs.glob("*")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path}\n" + "\n".join(tail))
        return "\n".join(parts)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node Slurm cluster; pass `slurm_cluster.env` to subprocesses."""
    ensure_slurm_installed()
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster runs its daemons and jobs as root")
    # short path: MUNGE and slurmd sockets live inside (108-byte socket path limit)
    root = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
