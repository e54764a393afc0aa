"""The sandbox with hostile candidates: each is contained and explained.

Every hostile candidate below attacks first and then returns the right answer, so a failed
containment would show as a pass. After each run: reward 0, the reason, no live process left in
the run's session or under its uid, the files it tried to write do not exist, and this (the
parent) process is alive with its process group.
"""

import os
import socket
import textwrap

import pytest
from sandbox_helpers import TEST, contained


def test_fork_bomb(isolated):
    contained(
        isolated,
        """
        import os
        def f(x):
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
            return 2
        """,
        {"timeout", "cpu_limit", "killed"},
    )


def test_fork_bomb_that_leaves_the_session(isolated):
    contained(
        isolated,
        """
        import os, time
        def f(x):
            for _ in range(4):
                if os.fork() == 0:
                    os.setsid()
                    time.sleep(30)
                    os._exit(0)
            return 3
        """,
        {"assertion"},
    )


def test_memory_bomb(isolated):
    contained(
        isolated,
        """
        def f(x):
            hog = []
            while True:
                hog.append(bytearray(50 * 2**20))
            return 2
        """,
        {"memory"},
        "MemoryError",
    )


def test_infinite_loop(isolated):
    contained(isolated, "def f(x):\n    while True:\n        pass\n", {"timeout"}, "wall-clock")


def test_busy_threads(isolated):
    contained(
        isolated,
        """
        import threading
        def spin():
            while True:
                pass
        def f(x):
            for _ in range(3):
                threading.Thread(target=spin, daemon=True).start()
            spin()
        """,
        {"timeout", "cpu_limit", "killed"},
    )


def test_no_network(isolated):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    program = f"""
    import socket
    def f(x):
        for host in ("127.0.0.1", "1.1.1.1", "8.8.8.8"):
            try:
                socket.create_connection((host, {port}), timeout=0.3).sendall(b"leak")
                return 2
            except OSError as err:
                last = err
        raise last
    """
    r = contained(isolated, program, {"error"}, "unreachable")
    with pytest.raises(TimeoutError):
        listener.accept()  # nothing connected
    listener.close()
    assert "Network is unreachable" in r.detail


def test_writing_outside_the_work_directory(isolated, tmp_path):
    targets = [tmp_path / "outside.txt", "/tmp/qrpo-sandbox-escape.txt", "/dev/shm/escape.txt"]
    program = f"""
    def f(x):
        errors = []
        for path in {[str(t) for t in targets]!r}:
            try:
                open(path, "w").write("pwned")
            except OSError as err:
                errors.append(err.strerror)
        if len(errors) == 3:
            raise OSError("; ".join(errors))
        return 2
    """
    contained(isolated, program, {"error"}, "Read-only file system")
    assert not any(os.path.exists(t) for t in targets)
    # inside the work directory, writing works (a private tmpfs)
    ok = isolated.run("def f(x):\n    open('a.txt', 'w').write('2')\n    return 2\n", TEST)
    assert ok.passed, ok


def test_killing_the_parent(isolated):
    me = os.getpid()
    program = f"""
    import os, signal
    def f(x):
        errors = []
        for attack in (
            lambda: os.kill(os.getppid(), signal.SIGKILL),
            lambda: os.kill({me}, signal.SIGKILL),
            lambda: os.killpg(os.getpgid({me}), signal.SIGKILL),
        ):
            try:
                attack()
            except OSError as err:
                errors.append(err)
        if len(errors) == 3:
            raise errors[0]
        os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)
        return 2
    """
    contained(isolated, program, {"error", "killed"})
    assert os.getpgid(0) == os.getpgid(me)


@pytest.mark.parametrize(
    "name,program,statuses,detail",
    [
        ("sys.exit at import", "import sys\nsys.exit(0)\n", {"exit"}, "SystemExit"),
        ("sys.exit in the test", "import sys\ndef f(x):\n    sys.exit(0)\n", {"exit"}, ""),
        ("os._exit(0)", "import os\ndef f(x):\n    os._exit(0)\n", {"no_result"}, "os._exit"),
        (
            "replaced AssertionError",
            "import builtins\nbuiltins.AssertionError = type('X', (Exception,), {})\n"
            "def f(x):\n    return 3\n",
            {"assertion"},
            "",
        ),
        (
            "patched builtins used by the test",
            "import builtins\nbuiltins.sorted = lambda *a, **k: [3]\ndef sorted(x):\n"
            "    return [3]\ndef f(x):\n    return 3\n",
            {"assertion"},
            "",
        ),
        (
            "always-equal object",
            "class A:\n    __eq__ = lambda s, o: True\n    __ne__ = lambda s, o: False\n"
            "def f(x):\n    return A()\n",
            {"assertion"},
            "",
        ),
        (
            "int subclass with a lying __eq__",
            "class I(int):\n    __eq__ = lambda s, o: True\ndef f(x):\n    return I(3)\n",
            {"assertion"},
            "",
        ),
        (
            "patched sys.exit and os._exit",
            "import os, sys\nos._exit = sys.exit = lambda *a: None\ndef f(x):\n    return 3\n",
            {"assertion"},
            "",
        ),
        (
            "forged pass record",
            "import os\ndef f(x):\n    os.write(3, b'P' + b'0' * 32 + b'\\n')\n    os._exit(0)\n",
            {"forged"},
            "foreign records",
        ),
        (
            "result channel spam",
            "import os\ndef f(x):\n    for fd in range(3, 12):\n        try:\n"
            "            os.write(fd, b'PASS\\nP\\n')\n        except OSError:\n            pass\n"
            "    return 3\n",
            {"forged"},
            "",
        ),
        (
            "nonce from the harness's frame",
            "import sys\ndef f(x):\n    frame = sys._getframe(1)\n    while frame.f_back:\n"
            "        frame = frame.f_back\n    return frame.f_locals\n",
            {"error"},
            "frames are not available",
        ),
        (
            "nonce through gc",
            "import gc\ndef f(x):\n    return [o for o in gc.get_objects() if isinstance(o, bytes)]\n",
            {"error"},
            "gc.get_objects",
        ),
        (
            "nonce through a traceback",
            "def f(x):\n    try:\n        raise ValueError\n    except ValueError as e:\n"
            "        return e.__traceback__.tb_frame.f_back.f_locals\n",
            {"error"},
            "frame access via tb_frame",
        ),
        (
            "nonce through /proc/self/mem",
            "def f(x):\n    return open('/proc/self/mem', 'rb').read(1)\n",
            {"error"},
            "Permission denied",
        ),
        (
            "nonce through a signal handler",
            "import signal, time\ndef f(x):\n    signal.signal(signal.SIGALRM, lambda s, fr: None)\n"
            "    signal.setitimer(signal.ITIMER_REAL, 0.01)\n    time.sleep(0.3)\n    return 2\n",
            {"killed"},
            "SIGALRM",  # the handler was never installed: the default action ends the process
        ),
        (
            "nonce through a fresh _signal module's handler",
            textwrap.dedent(
                """
                import _imp, importlib.machinery, os, time
                spec = importlib.machinery.ModuleSpec(
                    "_signal", importlib.machinery.BuiltinImporter, origin="built-in"
                )
                fresh = _imp.create_builtin(spec)
                _imp.exec_builtin(fresh)
                def steal(sig, frame):
                    while frame is not None:
                        for v in list(frame.f_locals.values()):
                            if isinstance(v, bytes) and v.startswith(b"P") and len(v) == 34:
                                os.write(3, v)
                                os._exit(0)
                        frame = frame.f_back
                fresh.signal(14, steal)
                fresh.setitimer(0, 0.001, 0.001)
                def f(x):
                    t = time.time()
                    while time.time() - t < 0.3:
                        pass
                    return 3
                """
            ),
            {"definition"},
            "Operation not permitted",
        ),
        (
            "line jump with a tracer",
            "import sys\ndef f(x):\n    sys.settrace(lambda *a: None)\n    return 3\n",
            {"error"},
            "sys.settrace",
        ),
        (
            "ctypes",
            "import ctypes\ndef f(x):\n    return 2\n",
            {"definition"},
            "not available",
        ),
    ],
)
def test_tampering_with_the_harness(isolated, name, program, statuses, detail):
    contained(isolated, program, statuses, detail)
