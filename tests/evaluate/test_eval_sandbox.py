"""The sandbox: honest candidates get their score, hostile ones are contained and explained.

Every hostile candidate below attacks first and then returns the right answer, so a failed
containment would show as a pass. After each run: reward 0, the reason, no live process left in
the run's session or under its uid, the files it tried to write do not exist, and this (the
parent) process is alive with its process group.
"""

import os
import socket
import textwrap
import warnings

import pytest

from common.code_reward import CodeProblem, run_tests, split_tests
from common.sandbox import (
    Sandbox,
    SandboxConfig,
    SandboxError,
    session_processes,
    uid_processes,
)
from evaluate.metrics import pass_at_k


@pytest.fixture(scope="module")
def sandbox():
    # Small limits keep the hostile runs short: 2 s CPU, 256 MiB, 1 s wall.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # missing layers: see `isolated`
            return Sandbox(SandboxConfig(cpu_seconds=2, memory_mb=256, wall_seconds=1.0, workers=2))
    except SandboxError as err:
        pytest.skip(f"no sandbox on this machine: {err}")


@pytest.fixture(scope="module")
def isolated(sandbox):
    """The sandbox, where the machine allows every isolation layer (the hostile corpus)."""
    if sandbox.missing_layers():
        pytest.skip(f"isolation layers unavailable here: {sandbox.missing_layers()}")
    return sandbox


TEST = "assert f(1) == 2\n"


def _contained(sb: Sandbox, program: str, statuses: set, detail: str = "", test: str = TEST):
    pgid = os.getpgid(0)
    [(test, _)] = split_tests(CodeProblem("hostile", "", tests=[test]))  # strict compare
    r = sb.run(textwrap.dedent(program), test)
    assert not r.passed, r
    assert r.status in statuses, (r.status, r.detail, r.stderr[-500:])
    assert detail.lower() in r.detail.lower(), (r.status, r.detail)
    assert session_processes(r.session) == []
    assert r.layers["uid"] is None or uid_processes(r.layers["uid"]) == []
    assert os.getpgid(0) == pgid  # the test process and its group are untouched
    return r


# --------------------------------------------------------------------------- honest


def test_correct_half_and_wrong_candidates(sandbox):
    problem = CodeProblem(
        "add",
        "def add(a, b):\n",
        test="def check(candidate):\n"
        "    assert candidate(1, 2) == 3\n"
        "    assert candidate(2, 2) == 4\n"
        "    assert candidate(0, 5) == 5\n"
        "    assert candidate(-1, 1) == 0\n",
        entry_point="add",
    )
    right = run_tests(sandbox, problem, "    return a + b\n")
    half = run_tests(sandbox, problem, "    return a + b if a > 0 else 99\n")
    wrong = run_tests(sandbox, problem, "    return None\n")
    assert (right.reward, right.status) == (1.0, "passed")
    assert (half.reward, half.status) == (0.5, "assertion")
    assert [t["status"] for t in half.tests] == ["passed", "passed", "assertion", "assertion"]
    assert half.tests[2]["test"] == "assert candidate(0, 5) == 5"
    assert wrong.reward == 0.0
    # pass@k by hand: the problem's 3 samples have c = 1 fully passing one.
    # pass@1 = 1 - C(2,1)/C(3,1) = 1/3; pass@2 = 1 - C(2,2)/C(3,2) = 2/3; pass@3 = 1.
    c = sum(r.reward == 1.0 for r in (right, half, wrong))
    assert pass_at_k(3, c, 1) == pytest.approx(1 / 3)
    assert pass_at_k(3, c, 2) == pytest.approx(2 / 3)
    assert pass_at_k(3, c, 3) == 1.0


def test_mbpp_asserts_loops_and_helpers(sandbox):
    problem = CodeProblem(
        "sq",
        [{"role": "user", "content": "write sq"}],
        tests=["assert sq(3) == 9", "assert [sq(i) for i in range(3)] == [0, 1, 4]"],
    )
    answer = "Here you go:\n```python\ndef sq(x):\n    return x * x\n```\nDone."
    assert run_tests(sandbox, problem, answer).reward == 1.0
    check = CodeProblem(
        "loop",
        "def f(x):\n",
        test="import math\n\ndef check(candidate):\n    xs = [1, 4, 9]\n"
        "    for x in xs:\n        assert candidate(x) == math.isqrt(x)\n"
        "    assert candidate(16.0) == 4\n",
        entry_point="f",
    )
    assert len(split_tests(check)) == 2
    r = run_tests(sandbox, check, "    return int(x ** 0.5)\n")
    assert r.reward == 1.0, r.tests


def test_plain_data_comparisons_stay_lenient(sandbox):
    """Subclasses and numeric types compare by value: only __eq__ tricks are refused."""
    program = """
    from collections import OrderedDict, defaultdict
    from fractions import Fraction
    def f(x):
        d = defaultdict(list); d["a"].append(1)
        return [OrderedDict(a=1), d, Fraction(1, 2), True, (1, 2.0)]
    """
    test = "assert f(1) == [{'a': 1}, {'a': [1]}, 0.5, 1, (1, 2)]\n"
    [(strict, _)] = split_tests(CodeProblem("lenient", "", tests=[test]))
    assert "__sandbox_cmp__" in strict
    r = sandbox.run(textwrap.dedent(program), strict)
    assert r.passed, r


def test_the_hardening_leaves_common_standard_library_use_alone(sandbox):
    """namedtuple, enum, typing and logging peek at frames, asyncio sets a SIGINT handler,
    types.coroutine rebuilds code objects: all still work for honest code."""
    program = """
    import asyncio, dataclasses, enum, heapq, logging, re
    from collections import Counter, namedtuple
    from fractions import Fraction
    from typing import NamedTuple, TypeVar
    T = TypeVar("T")
    P = namedtuple("P", "a b")
    class N(NamedTuple):
        a: int
    class E(enum.Enum):
        A = 1
    @dataclasses.dataclass
    class D:
        x: int
    logging.getLogger("x").warning("hi")
    async def one():
        return 1
    def f(x):
        items = [P(1, 2), N(1), E.A, D(1), Counter("ab"), Fraction(1, 3), re.compile("a")]
        return len(items) - 5 + asyncio.run(one()) - heapq.nsmallest(1, [1, 2])[0]
    """
    r = sandbox.run(textwrap.dedent(program), TEST)
    assert r.passed, (r.status, r.detail, r.stderr[-500:])


def test_timeout_and_syntax_stop_early(sandbox):
    problem = CodeProblem("t", "def f(x):\n", tests=["assert f(1) == 2"] * 3)
    r = run_tests(sandbox, problem, "    return (\n")
    assert r.status == "syntax" and r.reward == 0 and len(r.tests) == 3
    r = run_tests(sandbox, problem, "    return 2\nwhile True:\n    pass\n")
    assert r.status == "timeout" and "defining" in r.tests[0]["detail"]
    assert sum(t["seconds"] > 0 for t in r.tests) == 1  # the other two were not run


# --------------------------------------------------------------------------- hostile


def test_fork_bomb(isolated):
    _contained(
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
    _contained(
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
    _contained(
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
    _contained(isolated, "def f(x):\n    while True:\n        pass\n", {"timeout"}, "wall-clock")


def test_busy_threads(isolated):
    _contained(
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
    r = _contained(isolated, program, {"error"}, "unreachable")
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
    _contained(isolated, program, {"error"}, "Read-only file system")
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
    _contained(isolated, program, {"error", "killed"})
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
    _contained(isolated, program, statuses, detail)


def test_reports_what_the_machine_allows(isolated):
    layers = isolated.layers
    assert layers["netns"] and layers["mountns"] and layers["pidns"] and layers["ro_fs"]
    assert layers["seccomp"]
    if os.geteuid() == 0:
        assert layers["uid"] is not None and "/root" in layers["hidden"]


def test_without_root_a_user_namespace_gives_the_same_isolation():
    """As an unprivileged user (nobody, through setpriv, with the system's python3): the
    sandbox falls back to a user namespace and still has no network and a read-only disk."""
    import json
    import shutil
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    python = "/usr/bin/python3"
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists(python):
        pytest.skip("needs root, setpriv and /usr/bin/python3 to become an unprivileged user")
    script = textwrap.dedent(
        f"""
            import json, sys
            sys.path.insert(0, {str(repo)!r})
            from common.sandbox import Sandbox, SandboxConfig
            sb = Sandbox(SandboxConfig(workers=1, wall_seconds=2.0))
            out = {{"layers": sb.layers, "missing": sb.missing_layers()}}
            for name, body in [
                ("ok", "return 2"),
                ("write", "open('/tmp/qrpo-nobody-escape', 'w')\\n    return 2"),
                ("net", "import socket\\n    socket.create_connection(('1.1.1.1', 53), 1)"),
            ]:
                r = sb.run("def f(x):\\n    " + body + "\\n", "assert f(1) == 2\\n")
                out[name] = [r.status, r.detail]
            print(json.dumps(out))
            """
    )
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    if proc.returncode != 0 and "Permission denied" in proc.stderr:
        pytest.skip(f"nobody cannot read the repository: {proc.stderr[-300:]}")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    if out["missing"]:
        pytest.skip(f"no unprivileged user namespaces here: {out['missing']}")
    assert out["layers"]["userns"] and out["layers"]["uid"] is None
    assert out["ok"][0] == "passed"
    assert out["write"][0] == "error" and "Read-only" in out["write"][1]
    assert out["net"][0] == "error" and "unreachable" in out["net"][1]
    assert not os.path.exists("/tmp/qrpo-nobody-escape")
