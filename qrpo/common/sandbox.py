"""Isolated execution of untrusted code (model completions) against tests.

    sb = Sandbox(SandboxConfig(cpu_seconds=1, memory_mb=512))
    result = sb.run(program, test_source, entry_point="add")
    result.passed, result.status, result.detail     # True, "passed", ""

Each call runs one test in its own tree of child processes (see `sandbox_launcher.py`):

- a new session (the parent kills the whole process group at the end, even on success) and new
  mount, network, IPC, UTS and PID namespaces: no network at all (only a downed loopback),
  every mount read-only except a small private tmpfs that is the working directory and
  disappears with the run, an empty tmpfs over /root and /home (except the interpreter's own
  files), a fresh /proc that shows only the run's own processes, and PID 1 of the namespace
  whose exit makes the kernel kill every process left, even ones that left the session;
- resource limits set in the child: RLIMIT_CPU, RLIMIT_AS, RLIMIT_NPROC, RLIMIT_FSIZE,
  RLIMIT_NOFILE, RLIMIT_CORE=0, and a wall-clock timeout in the parent;
- as root, the test runs as an unprivileged uid of its own (one per worker, no groups, no new
  privileges), so it cannot signal the parent or write anything it does not own; without root,
  an unprivileged user namespace gives the same namespaces (where the kernel allows them);
- the verdict comes from the exit status plus a secret nonce that only the harness holds
  (details and the hardening of the interpreter in `sandbox_runner.run`).

Where namespaces are not available, the sandbox says so once (a RuntimeWarning) and runs with
rlimits, a session and the timeout only; `isolation="namespaces"` makes that an error instead.

What it does not contain: it is not a VM (a kernel exploit escapes it); without cgroups the
memory limit is address space, and CPU time is limited per process (the wall-clock timeout
bounds a tree of them); world-readable files outside the hidden directories can be read. The
interpreter-level hardening of the verdict is defence in depth, not a boundary: a candidate that
crafts bytecode (code objects can be rebuilt: the standard library does it) or loads a C
extension (`site_packages=true`) to read the interpreter's memory could find the nonce and
forge its own pass; what it can do to the machine stays contained by the layers above.
Statuses: passed, assertion, error, syntax, definition, exit, entry_point, memory, timeout,
cpu_limit, file_size, crash, killed, forged, no_result.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from qrpo.common.sandbox_processes import (
    kill_group,
    session_processes,
    uid_processes,
    wait_exit,
    world_enterable,
)
from qrpo.common.sandbox_result import RunResult, read_available, read_layers, read_tail, verdict

# The child side, passed to fresh interpreters as source (sandbox_launcher.py explains why).
LAUNCHER_SOURCE = Path(__file__).with_name("sandbox_launcher.py").read_text()
RUNNER_SOURCE = Path(__file__).with_name("sandbox_runner.py").read_text()
_WARNED: set[str] = set()


class SandboxError(RuntimeError):
    """The sandbox itself does not work on this machine (not a verdict on a candidate)."""


ISOLATIONS = ("auto", "namespaces", "basic")


def _doc(default, text: str, choices: tuple | None = None):
    # Standalone (this module does not import common): `choices` is the metadata that
    # qrpo.common.config.choice sets, so build_config checks the field all the same.
    meta = {"doc": text} if choices is None else {"doc": text, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class SandboxConfig:
    cpu_seconds: int = _doc(2, "CPU seconds per test (RLIMIT_CPU; SIGKILL one second later)")
    wall_seconds: float = _doc(5.0, "wall-clock seconds per test, process start-up included")
    memory_mb: int = _doc(1024, "address space per test in MiB (RLIMIT_AS)")
    nproc: int = _doc(16, "processes and threads of the sandbox uid (RLIMIT_NPROC)")
    fsize_mb: int = _doc(16, "largest file a test may write, MiB (RLIMIT_FSIZE)")
    tmpfs_mb: int = _doc(32, "size of the private writable working directory, MiB")
    nofile: int = _doc(256, "open file descriptors (RLIMIT_NOFILE)")
    workers: int = _doc(0, "tests run in parallel (0: one per CPU core)")
    isolation: str = _doc(
        "auto",
        "auto (namespaces where possible, else warn) | namespaces (else error) | basic "
        "(rlimits, session and timeout only)",
        ISOLATIONS,
    )
    hide: list = _doc(["/root", "/home"], "directories covered by an empty tmpfs in the sandbox")
    strict_compare: bool = _doc(True, "asserts compare values as plain data (no __eq__ tricks)")
    site_packages: bool = _doc(False, "candidates may import the interpreter's installed packages")
    uid_base: int = _doc(0, "as root: first sandbox uid, one per worker (0: derived from the pid)")
    python: str = _doc("", "interpreter that runs candidates (default: the current one)")

    def __post_init__(self):
        if self.isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be auto | namespaces | basic, got {self.isolation!r}")
        for name in ("cpu_seconds", "wall_seconds", "memory_mb", "nproc", "fsize_mb", "nofile"):
            if not getattr(self, name) > 0:  # NaN-safe
                raise ValueError(f"sandbox.{name} must be positive")


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


class Sandbox:
    """Runs tests of untrusted programs; thread-safe (one uid per concurrent run)."""

    def __init__(self, cfg: SandboxConfig | None = None):
        self.cfg = cfg or SandboxConfig()
        self.root = os.geteuid() == 0
        self.python = self.cfg.python or sys.executable
        real = os.path.realpath(self.python)
        prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
        if self.cfg.python:
            prefixes = {os.path.dirname(os.path.dirname(real))}
        self.expose = sorted({os.path.realpath(p) for p in prefixes} | {os.path.dirname(real)})
        self.workers = self.cfg.workers or os.cpu_count() or 1
        base = self.cfg.uid_base or 200_000 + (os.getpid() % 20_000) * 64
        self._slots: queue.Queue = queue.Queue()
        for i in range(max(self.workers, 1)):
            self._slots.put(base + i if self.root else None)
        self.layers: dict = {}
        self._probe()

    # ------------------------------------------------------------------ public

    def run(
        self,
        program: str,
        test: str,
        entry_point: str = "",
        *,
        cpu_seconds: int | None = None,
        wall_seconds: float | None = None,
        memory_mb: int | None = None,
    ) -> RunResult:
        """Define `program`, then run `test` (module code; with `entry_point`, it must define
        `check` and is called as `check(eval(entry_point))`). One test, one verdict."""
        cfg = self.cfg
        wall = wall_seconds or cfg.wall_seconds
        nonce = secrets.token_hex(16)
        payload = {"nonce": nonce, "program": program, "test": test, "entry_point": entry_point}
        with self._slot() as uid:
            workdir = tempfile.mkdtemp(prefix="qrpo-sandbox-")
            read_end, write_end = os.pipe()
            stdin = os.memfd_create("sandbox-payload")
            stderr = os.memfd_create("sandbox-stderr")
            try:
                if uid is not None:
                    os.chown(workdir, uid, uid)
                data = json.dumps(payload).encode()
                while data:
                    data = data[os.write(stdin, data) :]
                os.lseek(stdin, 0, os.SEEK_SET)
                spec = self._spec(
                    uid, workdir, write_end, cpu_seconds or cfg.cpu_seconds, memory_mb
                )
                t0 = time.monotonic()
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-B", "-c", LAUNCHER_SOURCE, spec],
                    stdin=stdin,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    pass_fds=(write_end,),
                    cwd=workdir,
                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                    start_new_session=True,
                )
                os.close(write_end)
                write_end = -1
                try:
                    timed_out = not wait_exit(proc, wall)
                finally:
                    kill_group(proc.pid)  # the whole group, even on success: no stragglers
                    proc.wait()
                seconds = time.monotonic() - t0
                channel = read_available(read_end)
                err_text = read_tail(stderr)
                layers = read_layers(channel)
                # A launcher that exited by itself waited for init, whose exit emptied the
                # PID namespace; otherwise look for what is left.
                if timed_out or proc.returncode < 0 or not layers.get("pidns"):
                    self._reap(proc.pid, uid)
            finally:
                for fd in (read_end, write_end, stdin, stderr):
                    if fd >= 0:
                        os.close(fd)
                shutil.rmtree(workdir, ignore_errors=True)
        result = verdict(channel, nonce, proc.returncode, timed_out)
        # the runner's own hardening, as it reported it (for the probe: a trusted program)
        layers["seccomp"] = b"\nDs\n" in channel
        result.seconds, result.session, result.layers = seconds, proc.pid, layers
        result.stderr = err_text
        return result

    # ------------------------------------------------------------------ internals

    def _spec(self, uid, workdir: str, fd: int, cpu: int, memory_mb: int | None) -> str:
        cfg = self.cfg
        return json.dumps(
            {
                "fd": fd,
                "uid": uid,
                "gid": uid,
                "workdir": os.path.realpath(workdir),
                "namespaces": cfg.isolation != "basic",
                "hide": list(cfg.hide),
                "expose": self.expose,
                "python": self.python,
                "site_packages": bool(cfg.site_packages),
                "runner_source": RUNNER_SOURCE,
                "cpu_seconds": int(cpu),
                "memory_bytes": int((memory_mb or cfg.memory_mb) * 2**20),
                "nproc": int(cfg.nproc),
                "fsize_bytes": int(cfg.fsize_mb * 2**20),
                "nofile": int(cfg.nofile),
                "tmpfs_kb": int(cfg.tmpfs_mb * 1024),
                "tmpfs_inodes": 4096,
                "env": {
                    "PATH": "/usr/local/bin:/usr/bin:/bin",
                    "HOME": os.path.realpath(workdir),
                    "TMPDIR": os.path.realpath(workdir),
                    "LANG": "C.UTF-8",
                    "OMP_NUM_THREADS": "1",
                    "OPENBLAS_NUM_THREADS": "1",
                    "MKL_NUM_THREADS": "1",
                },
            }
        )

    @contextmanager
    def _slot(self):
        uid = self._slots.get()
        try:
            yield uid
        finally:
            self._slots.put(uid)

    def _reap(self, sid: int, uid: int | None, timeout: float = 3.0) -> None:
        """Wait until no process of the run is left, killing any that are (a PID namespace
        does this by itself; without one, forks that left the session are found by uid)."""
        deadline = time.monotonic() + timeout
        while True:
            left = session_processes(sid) + (uid_processes(uid) if uid is not None else [])
            if not left:
                return
            for pid in left:
                with suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                _warn_once(f"sandbox: processes {left} of a finished run are still alive")
                return
            time.sleep(0.01)

    def _probe(self) -> None:
        """One trivial test that must pass: checks that the sandbox works here and which
        isolation layers the machine allows."""
        result = self.run("def f():\n    return 1\n", "assert f() == 1\n")
        if not result.passed or not result.layers:
            hint = ""
            if self.root and not result.layers.get("mountns") and not world_enterable(self.python):
                hint = (
                    f" The sandbox uid cannot reach {self.python} without a mount namespace: "
                    "set sandbox.python to an interpreter outside /root (e.g. /usr/bin/python3)."
                )
            raise SandboxError(
                f"the sandbox does not work on this machine: {result.status} {result.detail}; "
                f"layers {result.layers}; stderr: {result.stderr[-1000:]}.{hint}"
            )
        self.layers = result.layers
        if self.cfg.isolation == "basic":
            _warn_once(
                "sandbox: isolation=basic: no network, file-system or PID isolation "
                "(rlimits, a session and the timeout only)"
            )
            return
        missing = self.missing_layers()
        if missing:
            message = (
                f"sandbox: {', '.join(missing)} not available on this machine "
                f"({'; '.join(self.layers.get('errors', [])) or 'no detail'}): candidates are "
                "limited by rlimits, a session and the timeout only"
            )
            if self.cfg.isolation == "namespaces":
                raise SandboxError(message)
            _warn_once(message)

    def missing_layers(self) -> list[str]:
        want = {
            "netns": "network namespace",
            "mountns": "mount namespace",
            "pidns": "PID namespace",
            "ro_fs": "read-only file system",
            "seccomp": "seccomp filter on signal handlers",
        }
        missing = [text for key, text in want.items() if not self.layers.get(key)]
        if not self.root and not self.layers.get("userns"):
            missing.append("separate uid (user namespace)")
        return missing
