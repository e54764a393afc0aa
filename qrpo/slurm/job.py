"""A submitit job that runs one command per node and survives preemption and time limits.

Each task (one per node) starts its command (e.g. `accelerate launch ... -m qrpo.train ...`) as a
child process tree and waits for it. submitit installs a handler for its preemption signal
(SIGUSR2 by default, `signal_delay_s` before the time limit, or `scancel --signal=USR2 JOBID`);
this class wraps that handler so that, on every node where the signal lands:

1. the signal is forwarded to the whole child tree (the launcher ignores it; the training
   processes set a flag, agree with an all-reduce at the next step boundary, save one complete
   checkpoint together and exit with code 75);
2. on global rank 0 only, submitit then calls `checkpoint()`, which waits for the child to exit
   (within `signal_delay_s`) and returns the same job; submitit requeues it (`scontrol requeue`)
   and the requeued job reruns the same command, which resumes from the latest checkpoint.

Other ranks wait for the requeue to end them rather than report a result. Waiting for the child
happens on a thread that only stores its exit code: the main thread, where signal handlers run,
never holds a lock the handler could need.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission

from qrpo.common.constants import SOURCE_ROOT
from qrpo.slurm.config import SlurmConfig, time_minutes

EXIT_PREEMPTED = 75  # qrpo.train.preemption.EXIT_PREEMPTED (not imported: that pulls in torch)


class JobFailed(RuntimeError):
    """The command exited with an error; the message says where its log is."""


def preempt_signal() -> signal.Signals:
    """The signal submitit treats as preemption/timeout (SUBMITIT_PREEMPT_SIGNAL, default USR2)."""
    return signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG]


def _exit_on_term(signum, frame) -> None:
    print("[slurm] SIGTERM after preemption: leaving for the requeued job", flush=True)
    sys.exit(0)


def _completed(result: dict) -> dict:
    """What a requeued job returns when its command had already finished at the signal."""
    return result


class CommandJob(Checkpointable):
    """Run `command(env)` on every task; forward preemption; requeue through `checkpoint()`."""

    def __init__(self, cwd: str, env: dict[str, str], grace_s: float):
        self.cwd = cwd
        self.env = {str(k): str(v) for k, v in env.items()}
        self.grace_s = grace_s
        self._reset()

    def _reset(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._returncode: int | None = None
        self._signaled = False
        self._handling = False
        self._rank = 0

    # The runtime state (process, thread results) must not travel in the requeued pickle.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    # ---- to override
    def command(self, env: submitit.JobEnvironment) -> list[str]:
        raise NotImplementedError

    def describe(self) -> dict:
        """The job's result on success (paths to look at)."""
        return {}

    # ---- running
    def __call__(self) -> dict:
        env = submitit.JobEnvironment()
        self._rank = env.global_rank
        cmd = self.command(env)
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        print(f"[slurm] {env} restarts={restarts}\n[slurm] {shlex.join(cmd)}", flush=True)
        pythonpath = os.pathsep.join(
            p for p in (str(SOURCE_ROOT), os.environ.get("PYTHONPATH")) if p
        )
        self._proc = subprocess.Popen(
            cmd,
            cwd=self.cwd,
            env={**os.environ, "PYTHONPATH": pythonpath, **self.env},
            start_new_session=True,  # its own process group: Ctrl-C here is not sent twice
        )
        threading.Thread(target=self._reap, daemon=True).start()
        sig = preempt_signal()
        previous = signal.getsignal(sig)
        signal.signal(sig, lambda signum, frame: self._on_signal(signum, frame, previous))
        try:
            while self._returncode is None:
                time.sleep(0.2)
        finally:
            signal.signal(sig, previous)
            if self._returncode is None:  # leaving on an exception: leave no processes
                kill_tree(self._proc.pid)
        code = self._returncode
        if self._signaled or code == EXIT_PREEMPTED:
            return self._after_preemption(env, sig)
        if code != 0:
            raise JobFailed(
                f"command exited with code {code} on node {env.node} (task {env.global_rank}); "
                f"its output is in {env.paths.stdout} and {env.paths.stderr}"
            )
        print(f"[slurm] done on node {env.node}", flush=True)
        return self.describe()

    def _reap(self) -> None:
        self._returncode = self._proc.wait()

    def _on_signal(self, signum, frame, previous) -> None:
        if self._handling:  # a second signal while the first is being handled
            return
        self._handling = True
        self._signaled = True
        print(f"[slurm] {signal.Signals(signum).name}: forwarding to the command", flush=True)
        if self._returncode is None:
            signal_tree(self._proc.pid, signum)
        if self._rank != 0:
            # Rank 0 requeues the job once the checkpoint is complete, and SLURM then sends
            # SIGTERM, which submitit ignores: end this task at once instead of at KillWait.
            signal.signal(signal.SIGTERM, _exit_on_term)
        if callable(previous):  # submitit's: rank 0 calls checkpoint(), requeues, exits
            previous(signum, frame)
        self._handling = False

    def _after_preemption(self, env, sig) -> dict:
        if env.global_rank == 0 and not self._signaled and callable(signal.getsignal(sig)):
            # The command saw the signal and saved, but this process did not (the signal went to
            # the command alone): take submitit's path (checkpoint, requeue, exit) as if it had.
            print("[slurm] the command exited as preempted: requeueing", flush=True)
            os.kill(os.getpid(), sig)
            time.sleep(1)
        elif env.global_rank != 0:
            # Rank 0 requeues the job, which ends this task: wait for that rather than report a
            # result that the requeued run would contradict (SIGTERM ends it, writing none).
            signal.signal(signal.SIGTERM, _exit_on_term)
            deadline = time.time() + self.grace_s + 60
            while time.time() < deadline:
                time.sleep(1)
        return {**self.describe(), "preempted": True}

    def checkpoint(self, *args, **kwargs) -> DelayedSubmission:
        """Called by submitit on rank 0 in its signal handler: wait for the command, requeue."""
        if self._proc is None:  # the signal came before the command started
            return DelayedSubmission(self)
        deadline = time.time() + self.grace_s
        while self._returncode is None and time.time() < deadline:
            time.sleep(0.2)
        code = self._returncode
        if code is None:
            print(
                f"[slurm] the command did not exit within {self.grace_s:.0f} s of the signal: "
                "stopping it; the requeued job resumes from the last complete checkpoint",
                flush=True,
            )
            kill_tree(self._proc.pid)
        elif code == 0:
            print("[slurm] the command had finished: nothing to resume", flush=True)
            return DelayedSubmission(_completed, self.describe())
        else:
            print(f"[slurm] command exited with code {code}: requeueing", flush=True)
        return DelayedSubmission(self)


# --------------------------------------------------------------------------- processes


def _tree(pid: int) -> list:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def signal_tree(pid: int, signum: int) -> None:
    """Send `signum` to a process and all its descendants (launchers start workers in their
    own sessions, so the process group is not enough)."""
    import psutil

    for proc in _tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signum)


def kill_tree(pid: int, wait_s: float = 5.0) -> None:
    """SIGTERM the tree, then SIGKILL what is left after `wait_s`."""
    import psutil

    procs = _tree(pid)
    if not procs:
        return
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=wait_s)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


# --------------------------------------------------------------------------- rendezvous


def rendezvous_port(job_id: str, restarts: int = 0) -> int:
    """A port in [20000, 30000) that every node derives alike from the job id (and the requeue
    count, so that a requeued job does not meet the previous run's sockets)."""
    base = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return 20000 + (base + 7919 * restarts) % 10000


def node_address(name: str) -> str:
    """How other nodes reach node `name`: its NodeAddr in SLURM, or the name itself."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "node", name], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return name
    m = re.search(r"NodeAddr=(\S+)", out)
    return m.group(1) if m else name


# --------------------------------------------------------------------------- executors


def make_executor(cfg: SlurmConfig, folder: Path, job_name: str):
    """The submitit executor of `cfg.cluster`, with the job's resources."""
    minutes = time_minutes(cfg.time)
    setup = job_setup(cfg)
    if cfg.cluster == "debug":
        return submitit.DebugExecutor(folder=folder)
    if cfg.cluster == "local":
        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=cfg.max_requeues)
        ex.update_parameters(
            timeout_min=minutes,
            gpus_per_node=cfg.gpus_per_node,
            tasks_per_node=1,
            signal_delay_s=cfg.signal_delay_s,
            setup=setup,
        )
        return ex
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfg.max_requeues)
    ex.update_parameters(**sbatch_parameters(cfg, job_name, setup))
    return ex


def job_setup(cfg: SlurmConfig) -> list[str]:
    """Shell lines before the job: the project importable (the job unpickles its classes), then
    the user's own."""
    pythonpath = f"export PYTHONPATH={shlex.quote(str(SOURCE_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"
    return [pythonpath, *cfg.setup]


def sbatch_parameters(cfg: SlurmConfig, job_name: str, setup: list[str] | None = None) -> dict:
    params = {
        "job_name": job_name,
        "time": time_minutes(cfg.time),
        "nodes": cfg.nodes,
        "ntasks_per_node": 1,
        "signal_delay_s": cfg.signal_delay_s,
        "setup": setup or [],
    }
    optional = {
        "partition": cfg.partition,
        "account": cfg.account,
        "qos": cfg.qos,
        "constraint": cfg.constraint,
        "gpus_per_node": cfg.gpus_per_node,
        "cpus_per_task": cfg.cpus_per_task,
        "mem": f"{cfg.mem_gb}GB" if cfg.mem_gb else "",
        "array_parallelism": cfg.array_parallelism,
    }
    params.update({k: v for k, v in optional.items() if v})
    return params


def sbatch_script(cfg: SlurmConfig, folder: Path, job_name: str, array: int = 0) -> str:
    """The sbatch script submitit would write (for --dry-run)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = sbatch_parameters(cfg, job_name, job_setup(cfg))
    command = (
        f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    )
    return _make_sbatch_string(command=command, folder=folder, map_count=array or None, **params)


# Job states after which nothing more happens (a requeued job goes back to PENDING instead).
FINAL_STATES = {
    "BOOT_FAIL",
    "CANCELLED",
    "COMPLETED",
    "DEADLINE",
    "FAILED",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "TIMEOUT",
}


def in_queue(job_id: str) -> bool:
    """Whether the job (every task of an array) may still run: pending, running, completing,
    requeued. A failing `squeue` (a busy controller) counts as yes; an unknown id as no."""
    out = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0:
        return "Invalid job id" not in out.stderr
    states = out.stdout.split()
    return any(state.rstrip("+") not in FINAL_STATES for state in states)


def wait(jobs: list, timeout_s: float | None = None, poll_s: float = 2.0) -> list:
    """Wait for submitit jobs and return their results (a list per job: one entry per task).

    Without SLURM accounting, `sacct` fails and submitit cannot tell a finished job from a
    pending one; a SLURM job is over when every task wrote its result or squeue no longer lists
    it (then `results()` raises with the job's log if a task wrote none)."""
    deadline = None if timeout_s is None else time.time() + timeout_s
    for job in jobs:
        tasks = [job.task(i) for i in range(job.num_tasks)]
        while True:
            if all(t.paths.result_pickle.exists() for t in tasks):
                break
            if isinstance(job, submitit.SlurmJob):
                if not in_queue(job.job_id):
                    break
            elif job.done():
                break
            if deadline is not None and time.time() > deadline:
                raise TimeoutError(f"job {job.job_id} did not end within {timeout_s} s")
            time.sleep(poll_s)
    return [job.results() for job in jobs]
