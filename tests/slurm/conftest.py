"""A real two-node SLURM cluster on this machine, for the launcher's tests.

Two `slurmd` daemons (nodes n1 and n2, one CPU each) listen on loopback ports of this host next
to one `slurmctld`, authenticated by a private `munged`; all of it lives in a temporary folder
and is stopped at the end of the session. `SLURM_CONF` points every SLURM command of the tests
(and of the jobs, which inherit the environment) at it. No accounting: `sacct` fails, so the
tests read results from the jobs' files and `squeue`.

The packages (`slurm-wlm`, `munge`) are installed with apt-get when missing. The daemons need
root (or passwordless sudo); without it the cluster tests are skipped, saying why.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

PACKAGES = ("slurm-wlm", "munge")
BINARIES = ("slurmctld", "slurmd", "sbatch", "munged")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


class LocalSlurm:
    """munged + slurmctld + two slurmd on one machine; `start()` waits until both nodes are idle."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.sudo: list[str] = []

    # ---- set-up
    def prepare(self) -> str | None:
        """Install the packages when missing; a reason to skip, or None."""
        if os.geteuid() != 0:
            ok = shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"]).returncode == 0
            if not ok:
                return "the SLURM test cluster needs root or passwordless sudo to run its daemons"
            self.sudo = ["sudo", "-n", "--preserve-env=SLURM_CONF"]
        if all(_which(b) for b in BINARIES):
            return None
        if not shutil.which("apt-get"):
            return f"SLURM is not installed and there is no apt-get to install {PACKAGES}"
        apt = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "-q"]  # sudo drops env vars
        for cmd in (
            [*apt, "update"],
            [*apt, "install", "-y", "--no-install-recommends", *PACKAGES],
        ):
            out = subprocess.run([*self.sudo, *cmd], capture_output=True, text=True, timeout=900)
            if out.returncode != 0:
                return f"could not install {PACKAGES}: {' '.join(cmd)}: {out.stderr[-500:]}"
        missing = [b for b in BINARIES if not _which(b)]
        return f"installed {PACKAGES} but {missing} are missing" if missing else None

    def write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "munge-key", "munge-run"):
            (r / d).mkdir(exist_ok=True)
        key = r / "munge-key" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        (r / "munge-key").chmod(0o700)
        (r / "munge-run").chmod(0o755)
        if self.sudo:  # munged (root) wants its key owned by root
            subprocess.run(
                [*self.sudo, "chown", "-R", "root:root", str(r / "munge-key")], check=True
            )
        ctld, p1, p2 = _free_ports(3)
        host = socket.gethostname()
        user = "root"  # the daemons run as root (slurmd must switch to the job's user)
        self.conf.write_text(
            f"""ClusterName=qrpotest
SlurmctldHost={host}(127.0.0.1)
SlurmUser={user}
SlurmctldPort={ctld}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge-run/munge.socket
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
ReturnToService=2
MinJobAge=5
KillWait=5
MpiDefault=none
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={p1} CPUs=1 State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={p2} CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _daemon(self, name: str, *args: str) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")  # noqa: SIM115 (kept for the run)
        self.procs.append(
            subprocess.Popen(
                [*self.sudo, _which(args[0]), *args[1:]],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "SLURM_CONF": str(self.conf)},
            )
        )

    def start(self, timeout_s: float = 60) -> None:
        self.write_config()
        r = self.root
        self._daemon(
            "munged",
            "munged",
            "--foreground",
            "--force",
            f"--socket={r}/munge-run/munge.socket",
            f"--key-file={r}/munge-key/munge.key",
            f"--pid-file={r}/munge-run/munged.pid",
            f"--seed-file={r}/munge-key/munged.seed",
            f"--log-file={r}/log/munged.log",
        )
        deadline = time.time() + 20
        while not (r / "munge-run" / "munge.socket").exists():
            self._check_alive()
            if time.time() > deadline:
                raise RuntimeError("munged did not create its socket: " + self.logs())
            time.sleep(0.1)
        self._daemon("slurmctld", "slurmctld", "-D", "-i", "-f", str(self.conf))
        for node in ("n1", "n2"):
            self._daemon(f"slurmd-{node}", "slurmd", "-D", "-N", node, "-f", str(self.conf))
        deadline = time.time() + timeout_s
        while True:
            self._check_alive()
            out = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split()
            states = dict(zip(out[0::2], out[1::2]))
            if states.get("n1") == "idle" and states.get("n2") == "idle":
                return
            if time.time() > deadline:
                raise RuntimeError(f"nodes not idle after {timeout_s} s: {states}\n{self.logs()}")
            time.sleep(0.5)

    def _check_alive(self) -> None:
        dead = [p.args for p in self.procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"SLURM daemon exited: {dead}\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            parts.append(f"== {f.name}\n" + "\n".join(f.read_text().splitlines()[-15:]))
        return "\n".join(parts)

    # ---- use
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd, env=self.env(), capture_output=True, text=True, timeout=60, check=check
        )

    def stop(self) -> None:
        """Cancel what is left, then end the daemons this object started (their ids only)."""
        if self.conf.exists():
            ids = self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
            if ids:
                self.run("scancel", *ids, check=False)
                deadline = time.time() + 20
                while self.run("squeue", "-h", check=False).stdout.strip():
                    if time.time() > deadline:
                        break
                    time.sleep(0.5)
        for proc in reversed(self.procs):  # slurmd, slurmctld, then munged
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs.clear()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A started two-node cluster; SLURM_CONF points at it for the session."""
    from qrpo.common.tiny import ensure_tiny

    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm-cluster"))
    reason = cluster.prepare()
    if reason:
        pytest.skip(reason)
    ensure_tiny()  # built once here, read by every job (same HOME / QRPO_CACHE)
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
