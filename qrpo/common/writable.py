"""Output folders that can be written, checked before any model loads; and a full disk said as
such. A read-only run_dir used to fail after the model had loaded, with an OSError traceback;
a full disk (ENOSPC) failed inside torch or safetensors with nothing that says "disk"."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from qrpo.common.config import DISK_FULL, ConfigError


def check_writable(key: str, folder: str | Path) -> None:
    """A file can be created in `folder` (config key `key`), or, when it does not exist yet, in
    its nearest existing parent; nothing is left behind and no folder is created."""
    path = Path(folder).expanduser().absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}: {existing} is a file, not a folder ({key}={folder})")
    try:
        fd, probe = tempfile.mkstemp(prefix=".qrpo-write-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        what = "disk full" if err.errno in DISK_FULL else (err.strerror or str(err))
        raise ConfigError(f"{key}: cannot write in {existing}: {what}") from None


@contextmanager
def writing_to(where: str | Path):
    """Give an OSError raised without a file name (a write or close that hit a full disk) the
    path being written, so the one-line message can name it."""
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno is not None:
            raise OSError(err.errno, err.strerror, str(where)) from err
        raise
