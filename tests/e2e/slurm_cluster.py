"""A real two-node SLURM cluster on this machine, for the SLURM tests: munged, slurmctld and two
slurmd (n1-ib, n2-ib, both at 127.0.0.1 on their own ports), configured in a scratch directory and
torn down afterwards. Needs root and Debian's slurmctld, slurmd, slurm-client and munge packages."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")
NODES = ("n1-ib", "n2-ib")  # SLURM_JOB_NODELIST is then n[1-2]-ib: a suffix after the range


def missing_requirements() -> str | None:
    """Why a local cluster cannot start here, or None."""
    if os.geteuid() != 0:
        return "the local SLURM cluster runs its daemons as root"
    absent = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if absent:
        return f"SLURM/munge not installed (missing {', '.join(absent)}; apt-get install slurmctld slurmd slurm-client munge)"
    return None


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


class LocalSlurm:
    def __init__(self, root: Path, cpus_per_node: int = 2) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.cpus_per_node = cpus_per_node
        self._munged: subprocess.Popen | None = None

    def _config(self) -> str:
        ctld, *node_ports = _free_ports(1 + len(NODES))
        host = socket.gethostname()
        nodes = "\n".join(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus_per_node}"
                          for name, port in zip(NODES, node_ports))
        r = self.root
        return f"""ClusterName=vlforgetest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmctldPort={ctld}
AuthType=auth/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MailProg=/bin/true
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
KillWait=30
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""

    def _run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check)

    def start(self) -> None:
        for sub in ("state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._config())
        munge_dir = Path("/run/munge")
        munge_dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(munge_dir, "munge", "munge")
        if self._run("pgrep", "-x", "munged", check=False).returncode != 0:
            self._run("runuser", "-u", "munge", "--", "/usr/sbin/munged")
        self._run("slurmctld")
        for node in NODES:
            self._run("slurmd", "-N", node)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            idle = self._run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split("\n")
            if sum(line.endswith("idle") for line in idle) == len(NODES):
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM nodes did not come up:\n{(self.root / 'slurmctld.log').read_text()[-3000:]}")

    def stop(self) -> None:
        self._run("scancel", "--user=root", check=False)  # jobs first: slurmctld would keep them
        deadline = time.monotonic() + 30
        while self._run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.5)
        self._run("scontrol", "shutdown", check=False)
        deadline = time.monotonic() + 15
        while any(self._running(d) for d in ("slurmd", "slurmctld")) and time.monotonic() < deadline:
            time.sleep(0.5)
        for daemon in ("slurmd", "slurmctld"):
            self._run("pkill", "-KILL", "-x", daemon, check=False)

    def _running(self, daemon: str) -> bool:
        return self._run("pgrep", "-x", daemon, check=False).returncode == 0

    # --- jobs ------------------------------------------------------------------------------------

    def job_field(self, job: str, name: str) -> str | None:
        out = self._run("scontrol", "show", "job", job, check=False).stdout
        for token in out.split():
            if token.startswith(f"{name}="):
                return token.split("=", 1)[1]
        return None

    def wait_for(self, job: str, states: tuple[str, ...], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_field(job, "JobState")
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job} not in {states} after {timeout:.0f} s (state {self.job_field(job, 'JobState')})")

    def start_now(self, job: str, timeout: float = 120) -> None:
        """A requeued job waits about two minutes (SLURM's requeue delay); let it start sooner. The
        delay is set when the requeue completes, after the old processes are gone, so wait for the
        job to be pending again and repeat until it runs. Not at once, though: slurmd refuses a job
        credential created in the same second as the killed run's revocation (it compares whole
        seconds; "Job credential revoked" fails the job), which the delay exists to avoid."""
        deadline = time.monotonic() + timeout
        pending_since: float | None = None
        while time.monotonic() < deadline:
            state = self.job_field(job, "JobState")
            if state in ("RUNNING", "COMPLETED", "FAILED", "CANCELLED"):
                return
            if state == "PENDING":
                pending_since = pending_since or time.monotonic()
                if time.monotonic() - pending_since >= 2.0:
                    self._run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
            time.sleep(0.5)
        raise TimeoutError(f"requeued job {job} did not start within {timeout:.0f} s")

    def signal(self, job: str, name: str) -> None:
        self._run("scancel", f"--signal={name}", job)
