"""What every hostile sandbox run must leave behind (test_eval_sandbox*.py)."""

import os
import textwrap

from qrpo.common.code_reward import CodeProblem, split_tests
from qrpo.common.sandbox import Sandbox
from qrpo.common.sandbox_processes import session_processes, uid_processes

TEST = "assert f(1) == 2\n"


def contained(sb: Sandbox, program: str, statuses: set, detail: str = "", test: str = TEST):
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
