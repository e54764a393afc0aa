"""Code rewards: the fraction of a problem's asserts that a completion passes, in the sandbox.

A problem is a JSON row in one of two shapes:

    human-eval / LeetCodeDataset: {"task_id", "prompt", "test": "def check(candidate): assert ...",
                                   "entry_point": "add" (or an expression: "Solution().twoSum")}
    MBPP-style:                   {"task_id", "prompt", "tests": ["assert add(1, 2) == 3", ...]}

optionally with "setup" (code run before the program, e.g. imports). Every assert counts: the
body of `check` is split into one test per top-level statement that contains an assert, each
run with the statements that precede it (so set-up lines and loops keep working), in its own
sandboxed process. reward = passed / total; a sample is fully passing when reward == 1 (the c of
pass@k). With `strict_compare`, `assert a == b` (and !=, <, <=, >, >=) compares the two sides as
plain data, so an object whose __eq__ always says True does not pass.

The program is `setup + prompt + completion` for a text prompt (a continuation, cut at the
human-eval stop sequences), or the first fenced code block of the completion (else all of it)
for a chat prompt.
"""

from __future__ import annotations

import ast
import copy
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from qrpo.common.sandbox import Sandbox
from qrpo.common.sandbox_result import RunResult

STOP_SEQUENCES = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\nassert ")
_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)
_OPS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}


@dataclass
class CodeProblem:
    task_id: str
    prompt: str | list  # text to continue, or chat messages
    test: str = ""  # source defining check(candidate)
    entry_point: str = ""  # what check() receives: a name or an expression
    tests: list[str] = field(default_factory=list)  # or: assert statements at module level
    setup: str = ""

    @classmethod
    def from_row(cls, row: dict, index: int = 0) -> CodeProblem:
        if not row.get("test") and not row.get("tests"):
            raise ValueError(f"code problem {index}: needs 'test' (check function) or 'tests'")
        if row.get("test") and not row.get("entry_point"):
            raise ValueError(f"code problem {index}: 'test' needs an 'entry_point'")
        return cls(
            task_id=str(row.get("task_id", index)),
            prompt=row["prompt"],
            test=row.get("test", ""),
            entry_point=row.get("entry_point", ""),
            tests=list(row.get("tests", [])),
            setup=row.get("setup", ""),
        )


@dataclass
class CodeResult:
    reward: float  # passed / total
    passed: int
    total: int
    status: str  # "passed", or the first failing test's status
    detail: str
    tests: list[dict]  # per test: status, detail, seconds

    def to_dict(self) -> dict:
        return {
            "reward": self.reward,
            "passed": self.passed,
            "total": self.total,
            "status": self.status,
            "detail": self.detail,
            "tests": self.tests,
        }


# --------------------------------------------------------------------------- tests


class _StrictCompare(ast.NodeTransformer):
    """assert L op R  ->  assert __sandbox_cmp__('op', L, R) (evaluation order kept)."""

    def visit_Assert(self, node: ast.Assert) -> ast.Assert:
        t = node.test
        if isinstance(t, ast.Compare) and len(t.ops) == 1 and type(t.ops[0]) in _OPS:
            node.test = ast.Call(
                func=ast.Name("__sandbox_cmp__", ast.Load()),
                args=[ast.Constant(_OPS[type(t.ops[0])]), t.left, t.comparators[0]],
                keywords=[],
            )
        return node


def _has_assert(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Assert) for n in ast.walk(node))


def _is_check_call(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Name)
        and node.value.func.id == "check"
    )


def split_tests(problem: CodeProblem, strict: bool = True) -> list[tuple[str, str]]:
    """(test source, label) per assert (see the module docstring); the label is the original
    statement, for reports."""

    def render(module: ast.Module) -> str:
        if strict:
            module = _StrictCompare().visit(module)
        return ast.unparse(ast.fix_missing_locations(module))

    def label(stmt: ast.AST) -> str:
        return ast.unparse(stmt)[:200]

    if problem.tests:
        return [(render(ast.parse(t)), label(ast.parse(t))) for t in problem.tests]
    tree = ast.parse(problem.test)
    checks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    if not checks:
        raise ValueError(f"problem {problem.task_id}: the test defines no check(candidate)")
    check = checks[-1]
    module_prelude = [n for n in tree.body if n is not check and not _is_check_call(n)]
    units, prelude = [], []
    for stmt in check.body:
        if _has_assert(stmt):
            units.append([*prelude, stmt])
        else:
            prelude.append(stmt)
    if not units:  # no assert statement (e.g. explicit raises): the whole check is one test
        units = [check.body]
    out = []
    for body in units:
        text = label(body[-1])  # before the strict rewrite, which changes the nodes in place
        fn = copy.copy(check)
        fn.body, fn.decorator_list = body, []
        out.append((render(ast.Module(body=[*module_prelude, fn], type_ignores=[])), text))
    return out


def program_of(problem: CodeProblem, completion: str) -> str:
    """The code to define: a continuation of a text prompt, or the code of a chat answer."""
    setup = problem.setup + "\n" if problem.setup else ""
    if isinstance(problem.prompt, str):
        cut = min(
            [completion.find(s) for s in STOP_SEQUENCES if completion.find(s) >= 0]
            + [len(completion)]
        )
        return setup + problem.prompt + completion[:cut]
    blocks = _FENCE.findall(completion)
    if blocks:
        name = problem.entry_point.split("(")[0].split(".")[-1]
        code = next((b for b in blocks if name and name in b), blocks[0])
    else:
        code = completion
    return setup + code


# --------------------------------------------------------------------------- scoring


def run_tests(sandbox: Sandbox, problem: CodeProblem, completion: str) -> CodeResult:
    """Every test of `problem` against one completion, one sandboxed process per test. A
    failure before the candidate is defined (syntax error, a crash, exit or timeout at the top
    level) is the same for every test, so the rest are not run."""
    program = program_of(problem, completion)
    units = split_tests(problem, sandbox.cfg.strict_compare)
    entry = problem.entry_point if not problem.tests else ""
    results: list[RunResult] = []
    for i, (unit, _) in enumerate(units):
        r = sandbox.run(program, unit, entry)
        results.append(r)
        if not r.passed and not r.defined:
            skipped = f"{r.detail} (not run: the candidate failed before its tests)"
            results += [RunResult(r.status, skipped) for _ in units[i + 1 :]]
            break
    passed = sum(r.passed for r in results)
    first = next((r for r in results if not r.passed), None)
    return CodeResult(
        reward=passed / len(results),
        passed=passed,
        total=len(results),
        status="passed" if first is None else first.status,
        detail="" if first is None else first.detail,
        tests=[
            {"test": label, "status": r.status, "detail": r.detail, "seconds": round(r.seconds, 3)}
            for (_, label), r in zip(units, results)
        ],
    )


def score_problems(
    sandbox: Sandbox, problems: list[CodeProblem], completions: list[list[str]]
) -> list[list[CodeResult]]:
    """completions[i][j] (sample j of problem i) -> its CodeResult, `sandbox.workers` at once."""
    jobs = [(i, j) for i, cs in enumerate(completions) for j in range(len(cs))]
    with ThreadPoolExecutor(max_workers=sandbox.workers) as pool:
        done = list(
            pool.map(
                lambda ij: run_tests(sandbox, problems[ij[0]], completions[ij[0]][ij[1]]), jobs
            )
        )
    out: list[list[CodeResult]] = [[] for _ in completions]
    for (i, _), result in zip(jobs, done):
        out[i].append(result)
    return out
