"""Shared by the launcher tests: run the CLIs, read runs, wait for SLURM jobs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cache_root() -> str:
    """The folder of the tiny model's cache, passed to the jobs explicitly (env.QRPO_CACHE)."""
    return os.environ.get("QRPO_CACHE", str(Path.home() / ".cache" / "qrpo"))


# Every test job: CPU-only processes (gloo), one thread each, the tests' model cache.
CPU = ["gpus_per_node=0", "time=10", "env.OMP_NUM_THREADS=1", f"env.QRPO_CACHE={cache_root()}"]


def cli(module: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` from the project root (SLURM_CONF comes from the environment).

    Output goes through files, not pipes: a local job's controller inherits them and outlives
    the command, and reading a pipe would wait for the whole job."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        code = subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=ROOT,
            env=env,
            stdout=stdout,
            stderr=stderr,
            timeout=900,
        ).returncode
        stdout.seek(0)
        stderr.seek(0)
        out = subprocess.CompletedProcess(args, code, stdout.read(), stderr.read())
    if check:
        assert out.returncode == 0, f"{module} {args}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def job_id(out: subprocess.CompletedProcess, what: str = "job") -> str:
    m = re.search(rf"submitted {what}:? job (\d+)|submitted {what} (\d+)", out.stdout)
    assert m, out.stdout
    return m.group(1) or m.group(2)


def squeue(job: str) -> str:
    """The job's states and reasons, or '' once it is over (see qrpo.slurm.job.in_queue)."""
    from qrpo.slurm.job import in_queue

    if not in_queue(job):
        return ""
    return subprocess.run(
        ["squeue", "-h", "-j", job, "-t", "all", "-o", "%T %r"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout.strip()


def wait_gone(job: str, timeout_s: float = 300, release: bool = False) -> None:
    """Until the job is over. `release`: start a requeued job soon after it is pending on its
    BeginTime (SLURM holds requeued jobs ~2 minutes; StartTime=now lifts that). Not at once:
    the nodes revoke the previous run's credential by the second, and a restart within the same
    second fails ("Job credential revoked")."""
    deadline = time.time() + timeout_s
    held = None
    while state := squeue(job):
        if release and "BeginTime" in state:
            held = held or time.time()
            if time.time() - held > 2.5:
                subprocess.run(
                    ["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=60
                )
                held = None
        assert time.time() < deadline, f"job {job} not over after {timeout_s} s: {state}"
        time.sleep(0.3)


def losses(run_dir: Path) -> list[float]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(Path(run_dir) / "final" / "model.safetensors")


def wait_for_file(path: Path, timeout_s: float = 300) -> None:
    deadline = time.time() + timeout_s
    while not Path(path).exists():
        assert time.time() < deadline, f"no {path} within {timeout_s} s"
        time.sleep(0.2)


def wait_for_checkpoint(run_dir: Path, timeout_s: float = 300) -> str:
    marker = Path(run_dir) / "checkpoints" / "latest"
    deadline = time.time() + timeout_s
    while not marker.exists():
        assert time.time() < deadline, f"no checkpoint in {run_dir} within {timeout_s} s"
        time.sleep(0.05)
    return marker.read_text().strip()
