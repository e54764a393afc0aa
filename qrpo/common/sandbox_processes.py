"""The processes of sandbox runs, as the parent sees and ends them (Linux /proc, signals, pidfd)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path


def session_processes(sid: int) -> list[int]:
    """Live (not zombie) processes whose session id is `sid`."""
    out = []
    for pid, stat in _each_process("stat"):
        fields = stat.rsplit(b")", 1)[1].split()  # after the command name, which may hold spaces
        if int(fields[3]) == sid and fields[0] not in (b"Z", b"X"):
            out.append(pid)
    return out


def uid_processes(uid: int) -> list[int]:
    """Live processes whose real uid is `uid`."""
    out = []
    for pid, text in _each_process("status"):
        status = dict(line.split(b":", 1) for line in text.splitlines() if b":" in line)
        if status.get(b"State", b"").strip()[:1] in (b"Z", b"X"):
            continue
        if int(status.get(b"Uid", b"-1").split()[0]) == uid:
            out.append(pid)
    return out


def _each_process(file: str) -> Iterator[tuple[int, bytes]]:
    """(pid, /proc/<pid>/<file>) of every process, skipping those that end while being read."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/{file}", "rb") as f:
                text = f.read()
        except OSError:
            continue
        yield int(name), text


def wait_exit(proc: subprocess.Popen, timeout: float) -> bool:
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


def world_enterable(path: str) -> bool:
    """Every directory above the (resolved) path is enterable by any uid."""
    parts = Path(os.path.realpath(path)).parents
    return all(os.stat(p).st_mode & 0o001 for p in parts)


def kill_group(pgid: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
