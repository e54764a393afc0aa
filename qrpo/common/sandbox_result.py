"""What a sandbox run reports: the result channel read back into a `RunResult` and its verdict.

The records on the channel (one a line: L layers, D defined, F failure, P<nonce> passed) are
described in sandbox_launcher.py's docstring; a pass needs the nonce, no failure or foreign record,
and exit status 0.
"""

from __future__ import annotations

import hmac
import json
import os
import signal
from dataclasses import dataclass, field


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


def read_available(fd: int, limit: int = 1 << 18) -> bytes:
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


def read_tail(fd: int, n: int = 4000) -> str:
    size = os.fstat(fd).st_size
    return os.pread(fd, n, max(0, size - n)).decode(errors="replace")


def read_layers(channel: bytes) -> dict:
    first = channel.split(b"\n", 1)[0]
    if first.startswith(b"L"):
        try:
            return json.loads(first[1:])
        except ValueError:
            pass
    return {}


def verdict(channel: bytes, nonce: str, returncode: int, timed_out: bool) -> RunResult:
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
