"""A real one-node SLURM cluster for tests (Debian ``slurm-wlm`` + ``munge``; settings measured in issue 29).

:func:`start` writes ``/etc/slurm/slurm.conf`` (the job-step plugin strips ``SLURM_CONF`` before it calls ``srun``, so
the file must be at its default place), starts munged, ``slurmctld -i`` and ``slurmd`` as background processes and
waits until the node is idle; :meth:`Cluster.stop` cancels every job and stops each daemon by its PID. It needs
root and the SLURM binaries; :func:`unavailable` says why not, for a skip.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

CONF = Path("/etc/slurm/slurm.conf")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "srun")


def unavailable() -> str | None:
    """Why this machine cannot run the cluster (None when it can)."""
    if os.geteuid() != 0:
        return "the SLURM fixture needs root (it starts munged, slurmctld and slurmd)"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"no SLURM here ({', '.join(missing)} missing: apt-get install slurm-wlm munge)"
    return None


@dataclass
class Cluster:
    """The running daemons and where they keep their state."""

    state: Path
    host: str
    procs: list[subprocess.Popen] = field(default_factory=list)
    conf_backup: bytes | None = None

    def stop(self) -> None:
        """Cancel every job, then stop each daemon by its PID (SIGTERM, then SIGKILL after 10 s)."""
        subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True, timeout=30)
        for _ in range(50):  # jobs end before the daemons go
            if not subprocess.run(["squeue", "-h"], capture_output=True, text=True, timeout=30).stdout.strip():
                break
            time.sleep(0.2)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.conf_backup is not None:
            CONF.write_bytes(self.conf_backup)

    def log(self, name: str) -> str:
        path = self.state / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""


def _conf(state: Path, host: str, cpus: int, mem_mb: int) -> str:
    return "\n".join([
        "ClusterName=scmmtest", f"SlurmctldHost={host}", "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory", "DefMemPerCPU=500",
        "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={state}/jobcomp.txt", "MailProg=/bin/true", "ReturnToService=2", "MinJobAge=600",
        "KillWait=30", "SlurmdParameters=config_overrides", "SchedulerParameters=sched_interval=1",
        f"StateSaveLocation={state}/ctld", f"SlurmdSpoolDir={state}/spool", f"SlurmctldPidFile={state}/slurmctld.pid",
        f"SlurmdPidFile={state}/slurmd.pid", f"SlurmctldLogFile={state}/slurmctld.log",
        f"SlurmdLogFile={state}/slurmd.log", "SlurmctldPort=6817", "SlurmdPort=6818",
        f"NodeName={host} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""])


def start(state: Path, cpus: int = 4, mem_mb: int = 8000, timeout: float = 60) -> Cluster:
    """Start munged, slurmctld and slurmd with their state under ``state``; returns once the node is idle."""
    host = socket.gethostname().split(".")[0]
    state.mkdir(parents=True, exist_ok=True)
    for sub in ("ctld", "spool"):
        (state / sub).mkdir(exist_ok=True)
    cluster = Cluster(state, host, conf_backup=CONF.read_bytes() if CONF.is_file() else None)
    try:
        CONF.parent.mkdir(parents=True, exist_ok=True)
        CONF.write_text(_conf(state, host, cpus, mem_mb))
        run = Path("/run/munge")
        run.mkdir(parents=True, exist_ok=True)
        shutil.chown(run, "munge", "munge")
        daemons = [
            # munged runs as munge, which cannot enter a test's private temporary folder: its files go to /run/munge
            ["runuser", "-u", "munge", "--", "munged", "-F", "--log-file", str(run / "munged.log"),
             "--pid-file", str(run / "munged.pid"), "--seed-file", str(run / "seed")],
            ["slurmctld", "-D", "-i"],
            ["slurmd", "-D"],
        ]
        for i, (name, cmd) in enumerate(zip(("munged", "slurmctld", "slurmd"), daemons)):
            out = (state / f"{name}.out").open("w")
            cluster.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                                  start_new_session=True))
            if i == 0:
                _wait(lambda: (run / "munge.socket.2").exists(), 10, "munged", cluster)
        _wait(lambda: _node_state(host) == "idle", timeout, "the SLURM node to be idle", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _node_state(host: str) -> str:
    r = subprocess.run(["sinfo", "-h", "-n", host, "-o", "%t"], capture_output=True, text=True, timeout=30)
    return r.stdout.strip() if r.returncode == 0 else ""


def _wait(ready, timeout: float, what: str, cluster: Cluster) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ready():
            return
        dead = [p.args[0] for p in cluster.procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}: "
                               f"{cluster.log('slurmctld')[-2000:]}{cluster.log('slurmd')[-2000:]}")
        time.sleep(0.2)
    raise RuntimeError(f"timed out waiting for {what}: {cluster.log('slurmctld')[-2000:]}")
