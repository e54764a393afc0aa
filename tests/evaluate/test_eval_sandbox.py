"""The sandbox with honest candidates: they get their score; what it reports about the machine.

The hostile candidates, which must be contained and explained, are in test_eval_sandbox_hostile.py.
"""

import os
import textwrap

import pytest
from sandbox_helpers import TEST

from qrpo.common.code_reward import CodeProblem, run_tests, split_tests
from qrpo.evaluate.metrics import pass_at_k

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
            from qrpo.common.sandbox import Sandbox, SandboxConfig
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
