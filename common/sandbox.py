"""Isolated execution of untrusted code (model completions) against tests.

    sb = Sandbox(SandboxConfig(cpu_seconds=1, memory_mb=512))
    result = sb.run(program, test_source, entry_point="add")
    result.passed, result.status, result.detail     # True, "passed", ""

Each call runs one test in its own tree of child processes (see `sandbox_child.py`):

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
  (details and the hardening of the interpreter in `sandbox_child.run`).

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

import hmac
import json
import os
import queue
import secrets
import select
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

CHILD_SOURCE = Path(__file__).with_name("sandbox_child.py").read_text()
_WARNED: set[str] = set()


class SandboxError(RuntimeError):
    """The sandbox itself does not work on this machine (not a verdict on a candidate)."""


ISOLATIONS = ("auto", "namespaces", "basic")


def _doc(default, text: str, choices: tuple | None = None):
    # Standalone (this module does not import common): `choices` is the metadata that
    # common.config.choice sets, so build_config checks the field all the same.
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
            if getattr(self, name) <= 0:
                raise ValueError(f"sandbox.{name} must be positive")


@dataclass
class RunResult:
    status: str  # "passed" or why not (see the module docstring)
    detail: str = ""
    defined: bool = False  # the candidate's top-level code ran
    seconds: float = 0.0
    returncode: int | None = None
    session: int = 0  # session id (= pid of the launcher) of the run's processes
    layers: dict = field(default_factory=dict)
    stderr: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


SIGNAL_STATUS = {
    signal.SIGXCPU: "cpu_limit",
    signal.SIGKILL: "killed",
    signal.SIGXFSZ: "file_size",
    signal.SIGSEGV: "crash",
    signal.SIGBUS: "crash",
    signal.SIGABRT: "crash",
    signal.SIGILL: "crash",
    signal.SIGFPE: "crash",
}


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def session_processes(sid: int) -> list[int]:
    """Live (not zombie) processes whose session id is `sid`."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] not in (b"Z", b"X"):
            out.append(int(name))
    return out


def uid_processes(uid: int) -> list[int]:
    """Live processes whose real uid is `uid`."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status", "rb") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        status = dict(line.split(b":", 1) for line in lines if b":" in line)
        if status.get(b"State", b"").strip()[:1] in (b"Z", b"X"):
            continue
        if int(status.get(b"Uid", b"-1").split()[0]) == uid:
            out.append(int(name))
    return out


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
                    [sys.executable, "-I", "-S", "-B", "-c", CHILD_SOURCE, "launch", spec],
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
                    timed_out = not _wait(proc, wall)
                finally:
                    _killpg(proc.pid)  # the whole group, even on success: no stragglers
                    proc.wait()
                seconds = time.monotonic() - t0
                channel = _read_available(read_end)
                err_text = _tail(stderr)
                layers = _layers(channel)
                # A launcher that exited by itself waited for init, whose exit emptied the
                # PID namespace; otherwise look for what is left.
                if timed_out or proc.returncode < 0 or not layers.get("pidns"):
                    self._reap(proc.pid, uid)
            finally:
                for fd in (read_end, write_end, stdin, stderr):
                    if fd >= 0:
                        os.close(fd)
                shutil.rmtree(workdir, ignore_errors=True)
        result = _verdict(channel, nonce, proc.returncode, timed_out)
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
                "source": CHILD_SOURCE,
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
            if self.root and not result.layers.get("mountns") and not _world_enterable(self.python):
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


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for the launcher to exit (True) or the timeout (False), without polling."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # no pidfd (old kernel): Popen's polling wait
        try:
            proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(pidfd)


def _world_enterable(path: str) -> bool:
    """Every directory above the (resolved) path is enterable by any uid."""
    parts = Path(os.path.realpath(path)).parents
    return all(os.stat(p).st_mode & 0o001 for p in parts)


def _killpg(pgid: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _read_available(fd: int, limit: int = 1 << 18) -> bytes:
    os.set_blocking(fd, False)
    chunks, size = [], 0
    while size < limit:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _tail(fd: int, n: int = 4000) -> str:
    size = os.fstat(fd).st_size
    return os.pread(fd, n, max(0, size - n)).decode(errors="replace")


def _layers(channel: bytes) -> dict:
    first = channel.split(b"\n", 1)[0]
    if first.startswith(b"L"):
        try:
            return json.loads(first[1:])
        except ValueError:
            pass
    return {}


def _verdict(channel: bytes, nonce: str, returncode: int, timed_out: bool) -> RunResult:
    """Pass only with the nonce record, no failure or foreign record, and exit status 0."""
    lines = channel.split(b"\n")
    if lines and lines[0].startswith(b"L"):
        lines = lines[1:]
    defined, passed, failure, forged = False, False, None, []
    for line in lines:
        if not line:
            continue
        if line in (b"D", b"Ds"):
            defined = True
        elif line.startswith(b"P"):
            if hmac.compare_digest(line[1:], nonce.encode()):
                passed = True
            else:
                forged.append(line[:60])
        elif line.startswith(b"F") and failure is None:
            try:
                failure = json.loads(line[1:])
                failure = {"kind": str(failure["kind"]), "detail": str(failure.get("detail", ""))}
            except (ValueError, KeyError, TypeError):
                forged.append(line[:60])
        else:
            forged.append(line[:60])
    if timed_out:
        where = "" if defined else " (while defining the candidate)"
        return RunResult("timeout", f"wall-clock limit reached{where}", defined, returncode=None)
    if forged or (passed and failure is not None):
        shown = b"; ".join(forged).decode(errors="replace")
        return RunResult("forged", f"foreign records on the result channel: {shown}", defined)
    if passed and returncode == 0:
        return RunResult("passed", "", defined, returncode=returncode)
    if failure is not None:
        kind = failure["kind"] if failure["kind"] != "harness" else "error"
        return RunResult(kind, failure["detail"], defined, returncode=returncode)
    if returncode is not None and returncode > 128:
        sig = returncode - 128
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        status = SIGNAL_STATUS.get(sig, "killed")
        return RunResult(status, f"terminated by {name}", defined, returncode=returncode)
    if returncode == 0:
        return RunResult(
            "no_result",
            "exited with status 0 but without the harness's result (sys.exit/os._exit in "
            "the candidate?)",
            defined,
            returncode=returncode,
        )
    return RunResult("crash", f"exit status {returncode}", defined, returncode=returncode)
