"""A throwaway single-node SLURM cluster on localhost, for tests and demos of `nulls-launch`.

Owns: the generated munge key and slurm.conf, starting munged / slurmctld / slurmd (as root, in the
background, all state under one temporary directory), waiting until the node is idle, and stopping the
daemons by PID. Client commands reach this cluster through `cluster.env` (SLURM_CONF). Needs Debian's
`slurm-wlm` (or `slurmctld slurmd slurm-client`) and `munge` packages, and root.

    with LocalSlurmCluster(tmp_dir) as cluster:
        subprocess.run(["sbatch", "--wrap", "hostname"], env=cluster.env)
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

REQUIRED_BINARIES = ("munged", "slurmctld", "slurmd", "slurmstepd", "sbatch", "srun", "sinfo", "scontrol")
NODE_NAME = "localhost"
PARTITION = "debug"
# Also the wait before a requeued job may start again (slurm.conf: AuthInfo cred_expire; default 120 s).
CRED_EXPIRE_S = 10


def missing_requirements() -> str | None:
    """Why a local cluster cannot start here, or None when it can."""
    missing = [name for name in REQUIRED_BINARIES if shutil.which(name) is None]
    if missing:
        return f"SLURM/munge binaries not found: {', '.join(missing)} (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the local SLURM cluster runs slurmd as root; current user is not root"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _real_memory_mb() -> int:
    pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    # Leave a quarter for the OS and the daemons, as a real node would.
    return int(pages / 2**20 * 0.75)


@dataclass
class LocalSlurmCluster:
    """Daemons for one node named `localhost` with `cpus` CPUs in partition `debug` (the default)."""

    root: Path
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    start_timeout_s: float = 60.0
    _procs: dict[str, subprocess.Popen] = field(default_factory=dict, init=False, repr=False)

    @property
    def conf_path(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands (sbatch, squeue, scontrol, ...) against this cluster."""
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf_path)
        return env

    def __enter__(self) -> LocalSlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        reason = missing_requirements()
        if reason:
            raise RuntimeError(reason)
        self.root = Path(self.root).resolve()
        for sub in ("etc", "munge", "state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._write_munge_key()
        self.conf_path.write_text(self._slurm_conf())
        try:
            self._start_munged()
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf_path)])
            self._wait_for(lambda: self._client_ok(["scontrol", "ping"]), "slurmctld to answer scontrol ping")
            self._spawn("slurmd", ["slurmd", "-D", "-N", NODE_NAME, "-f", str(self.conf_path)])
            self._wait_for(self._node_idle, f"node {NODE_NAME} to be idle in sinfo")
        except BaseException:
            self.stop()
            raise
        log.info("local SLURM cluster up: SLURM_CONF=%s", self.conf_path)

    def stop(self) -> None:
        """Cancel what is still queued or running (slurmstepd outlives slurmd), then stop the daemons we
        started, by PID, slurmd first."""
        ctld = self._procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            self._cancel_all_jobs()
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _cancel_all_jobs(self, timeout_s: float = 60.0) -> None:
        def job_ids() -> list[str]:
            result = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True,
                                    timeout=30)
            return result.stdout.split()

        ids = job_ids()
        if not ids:
            return
        subprocess.run(["scancel", "--full", *ids], env=self.env, capture_output=True, timeout=30)
        deadline = time.monotonic() + timeout_s
        while job_ids() and time.monotonic() < deadline:
            time.sleep(0.5)

    def _write_munge_key(self) -> None:
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        key.chmod(0o400)

    def _start_munged(self) -> None:
        munge_dir = self.root / "munge"
        munge_dir.chmod(0o700)
        cmd = [
            "munged", "--foreground", "--force",
            f"--key-file={munge_dir / 'munge.key'}",
            f"--socket={self.munge_socket}",
            f"--pid-file={munge_dir / 'munged.pid'}",
            f"--log-file={self.root / 'log' / 'munged.log'}",
            f"--seed-file={munge_dir / 'munged.seed'}",
        ]
        self._spawn("munged", cmd)
        self._wait_for(self.munge_socket.exists, "the munge socket")

    def _slurm_conf(self) -> str:
        state, spool, logs, run = (self.root / sub for sub in ("state", "spool", "log", "run"))
        lines = [
            "ClusterName=nullslocal",
            f"SlurmctldHost={NODE_NAME}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE_S}",
            f"StateSaveLocation={state}",
            f"SlurmdSpoolDir={spool}",
            f"SlurmctldPidFile={run / 'slurmctld.pid'}",
            f"SlurmdPidFile={run / 'slurmd.pid'}",
            f"SlurmctldLogFile={logs / 'slurmctld.log'}",
            f"SlurmdLogFile={logs / 'slurmd.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SchedulerType=sched/backfill",
            "MpiDefault=none",
            "ReturnToService=2",
            "JobRequeue=1",
            "MinJobAge=600",
            "KillWait=10",
            "InactiveLimit=0",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=60",
            f"NodeName={NODE_NAME} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_real_memory_mb()} State=UNKNOWN",
            f"PartitionName={PARTITION} Nodes={NODE_NAME} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
        ]
        return "\n".join(lines) + "\n"

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "ab")
        self._procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                             start_new_session=True)
        out.close()

    def _client_ok(self, cmd: list[str]) -> bool:
        return subprocess.run(cmd, env=self.env, capture_output=True, timeout=30).returncode == 0

    def _node_idle(self) -> bool:
        result = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True,
                                text=True, timeout=30)
        return f"{NODE_NAME} idle" in result.stdout

    def _wait_for(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode} while waiting for {what}; "
                                       f"logs in {self.root / 'log'}")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out after {self.start_timeout_s}s waiting for {what}; logs in {self.root / 'log'}")
