"""One writer per run folder: an OS lock (fcntl.flock) on a lock file inside the folder.

    with hold(run_dir, "run.run_dir"):        # train: RUN_DIR/.qrpo.lock
        ...                                    # a second process refuses with one line
    with hold_file(out, "out"):                # evaluate, merge: OUT.json.lock beside the file

Why flock and not a pid file: the kernel drops the lock when its process dies (killed, crashed,
preempted), so there is no stale lock to detect or clean up and no pid to probe on another node.
The pid and host written into the file are only for the message that names the holder. The lock
file is never deleted: deleting it while another process has it open would let two processes
each hold a lock on a different file of the same name.

On a filesystem without flock (some Lustre or old NFS mounts) the run goes on unlocked, with a
warning: refusing every run there would be worse than the race the lock guards against.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from qrpo.common.config import ConfigError

LOCK_NAME = ".qrpo.lock"


class RunLockError(ConfigError):
    """Another process holds the folder's lock; the message names it (pid@host) and the folder."""


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    # The holder writes its line right after it takes the lock: an empty file is one just taken.
    return text.splitlines()[0] if text else "another process (it has not written its pid yet)"


@contextmanager
def hold_path(lock_path: Path, what: str, key: str = "") -> Iterator[Path]:
    """Hold the lock at `lock_path` for the `with` body, or raise RunLockError at once (never
    wait: a second writer is a mistake to report, not a turn to take)."""
    lock_path = Path(lock_path)
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:  # a read-only or full disk: the first write of the run says so
        raise ConfigError(
            f"{what}: cannot write its lock file {lock_path}: {err.strerror}"
        ) from None
    try:
        if _take(fd, lock_path, what, key):
            stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}@{socket.gethostname()} since {stamp}\n".encode(), 0)
        yield lock_path
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _take(fd: int, lock_path: Path, what: str, key: str) -> bool:
    """Lock `fd` (True), go on unlocked where flock is not supported (False), or raise."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            hint = f"; wait for it to finish, or give another {key}" if key else ""
            raise RunLockError(
                f"{what} is in use by {_holder(lock_path)} (lock file {lock_path}){hint}"
            ) from None
        print(
            f"warning: cannot lock {lock_path} ({os.strerror(err.errno)}): this filesystem has "
            "no flock, so nothing stops a second process from writing here too",
            file=sys.stderr,
        )
        return False
    return True


def check_free(folder: str | Path, key: str = "") -> None:
    """Raise RunLockError when a process holds FOLDER's lock; creates nothing. For a check that
    must come before others that write nothing when they refuse (the lock's own file included),
    so that a busy folder is the error reported."""
    lock_path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:  # no lock file: never locked, so not held
        return
    try:
        _take(fd, lock_path, f"{folder}", key)  # writes nothing: the file keeps its holder line
    finally:
        os.close(fd)


def hold(folder: str | Path, key: str = "") -> AbstractContextManager[Path]:
    """Lock a run folder (created if absent) through FOLDER/.qrpo.lock."""
    folder = Path(folder)
    return hold_path(folder / LOCK_NAME, f"{folder}", key)


def hold_file(output: str | Path, key: str = "") -> AbstractContextManager[Path]:
    """Lock one output file through OUTPUT.lock beside it: outputs that share a folder (several
    evaluations in runs/eval/) do not block each other."""
    output = Path(output)
    return hold_path(output.with_name(output.name + ".lock"), f"{output}", key)
