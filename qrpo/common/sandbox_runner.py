"""The child side of `qrpo.common.sandbox`, second half: the test runner (standard library).

The launcher (sandbox_launcher.py) execs a fresh interpreter on this file's source as the sandbox
uid, with resource limits and no new privileges already set, stdin holding the payload and fd 3
the result channel (its records: sandbox_launcher.py's docstring). `run` hardens the interpreter,
defines the candidate and runs one test.
"""

import os
import sys

PR_SET_DUMPABLE = 4
RESULT_FD = 3  # the result channel, as the launcher left it

# (AUDIT_ARCH_*, rt_sigaction syscall number) per machine
SECCOMP_ARCHES = {"x86_64": (0xC000003E, 13), "aarch64": (0xC00000B7, 134)}


def _deny_sigaction(ctypes) -> bool:
    """Install a seccomp filter that makes rt_sigaction fail with EPERM (and kills on a foreign
    syscall ABI, and refuses x32 calls). Needs no_new_privs, which the launcher set."""
    arch = SECCOMP_ARCHES.get(os.uname().machine)
    if arch is None:
        return False
    audit_arch, nr_sigaction = arch
    ld_abs, jeq, ret = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET
    jge = 0x35  # BPF_JMP|BPF_JGE|BPF_K
    allow, kill, eperm = 0x7FFF0000, 0x80000000, 0x00050000 | 1
    program = [
        (ld_abs, 0, 0, 4),  # A = seccomp_data.arch
        (jeq, 1, 0, audit_arch),
        (ret, 0, 0, kill),
        (ld_abs, 0, 0, 0),  # A = seccomp_data.nr
        (jge, 0, 1, 0x40000000),  # x32 ABI on x86_64
        (ret, 0, 0, eperm),
        (jeq, 0, 1, nr_sigaction),
        (ret, 0, 0, eperm),
        (ret, 0, 0, allow),
    ]

    class Filter(ctypes.Structure):
        _fields_ = [
            ("code", ctypes.c_ushort),
            ("jt", ctypes.c_ubyte),
            ("jf", ctypes.c_ubyte),
            ("k", ctypes.c_uint),
        ]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(program))(*[Filter(*f) for f in program])
    fprog = Program(len(program), filters)
    pr_set_seccomp, seccomp_mode_filter = 22, 2
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(pr_set_seccomp, seccomp_mode_filter, ctypes.byref(fprog), 0, 0) == 0


def run() -> None:
    """One test of one candidate, in a fresh interpreter as the sandbox uid.

    Everything used after the candidate's code starts is captured here first, as locals and
    closure cells: a candidate can patch builtins, modules, `sys.exit`, `os._exit` or this
    module's globals without changing what the harness calls. Audit hooks block the ways to
    reach this function's frame (frames, tracing, gc, ctypes); signal handlers, which receive
    frames, are never installed (signal.signal is a no-op and a seccomp filter refuses
    rt_sigaction); the process is made non-dumpable so /proc/self/mem is closed.
    """
    import _signal
    import builtins
    import json
    import numbers
    import operator
    import signal

    b = builtins
    BaseException, AssertionError, MemoryError = b.BaseException, b.AssertionError, b.MemoryError
    RecursionError, SystemExit, SyntaxError = b.RecursionError, b.SystemExit, b.SyntaxError
    ValueError, OverflowError, ImportError = b.ValueError, b.OverflowError, b.ImportError
    PermissionError, compile, exec, eval = b.PermissionError, b.compile, b.exec, b.eval
    type, isinstance, hasattr, all, range = b.type, b.isinstance, b.hasattr, b.all, b.range
    str, bytes, int, float, complex = b.str, b.bytes, b.int, b.float, b.complex
    dict, list, tuple, set, frozenset = b.dict, b.list, b.tuple, b.set, b.frozenset
    write, read, close, _exit, dumps = os.write, os.read, os.close, os._exit, json.dumps
    fd = RESULT_FD  # a module global could be rebound by the candidate
    startswith, partition, encode = str.startswith, str.partition, str.encode
    sigfunc, SIG_DFL, NSIG = _signal.signal, _signal.SIG_DFL, _signal.NSIG
    Number = numbers.Number
    pristine = dict(b.__dict__)  # the test's builtins: whatever the candidate patches later

    # ---- payload (program, test, nonce) on stdin, which is then closed for good
    chunks = []
    while True:
        chunk = read(0, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    close(0)
    os.open(os.devnull, os.O_RDONLY)  # takes fd 0
    payload = json.loads(b"".join(chunks))
    ok = b"P" + encode(payload.pop("nonce")) + b"\n"
    del chunks

    def fail(kind, detail=""):
        write(fd, b"F" + encode(dumps({"kind": kind, "detail": detail[:500]})) + b"\n")
        _exit(1)

    def describe(err):
        try:
            text = str(err)
            return type(err).__name__ + (": " + text if text else "")
        except BaseException:
            return "(exception that cannot be printed)"

    # ---- hardening
    # Non-dumpable: /proc/self/mem, ptrace and process_vm_readv are closed to the uid. The
    # seccomp filter refuses rt_sigaction: no new signal handler (which would receive this
    # function's frame) from any copy of the _signal module, here or in forks.
    seccomp = False
    try:
        import ctypes

        ctypes.CDLL(None).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
        seccomp = _deny_sigaction(ctypes)
        del ctypes
    except Exception:
        pass
    for name in [m for m in sys.modules if partition(m, ".")[0] in ("ctypes", "_ctypes")]:
        del sys.modules[name]
    # signal.signal keeps the current handler and says it did (asyncio.run, for one, sets a
    # SIGINT handler): a handler the candidate asks for is never installed.
    guard_ns = {}
    exec(
        "def signal(signalnum, handler):\n    return getsignal(signalnum)\n",
        {"__builtins__": {}, "getsignal": _signal.getsignal},
        guard_ns,
    )
    _signal.signal = signal.signal = guard_ns["signal"]  # no closure: nothing to reach through
    del guard_ns

    blocked = frozenset(
        {
            "sys._getframe",
            "sys._current_frames",
            "sys._current_exceptions",
            "sys.settrace",
            "sys.setprofile",
            "sys.addaudithook",
            "gc.get_objects",
            "gc.get_referrers",
            "gc.get_referents",
            "sys.monitoring.register_callback",  # Python 3.12+: callbacks receive code/frames
        }
    )
    blocked_imports = frozenset(
        {"ctypes", "_ctypes", "cffi", "_cffi_backend", "_testcapi", "_testinternalcapi"}
    )

    frame_attributes = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame"})

    def audit(event, args):
        if event == "object.__getattr__":  # also raised for __code__ etc., which `types` reads
            if args[1] in frame_attributes:
                raise PermissionError("blocked in the sandbox: frame access via " + args[1])
            return
        if event in blocked or startswith(event, "ctypes."):
            if event in ("sys._getframe", "sys._current_frames"):
                # ValueError is what _getframe raises past the stack's end: namedtuple, enum
                # and logging, which peek at their caller's frame, carry on without it.
                raise ValueError("frames are not available in the sandbox")
            raise PermissionError("blocked in the sandbox: " + event)
        if event == "import" and partition(args[0], ".")[0] in blocked_imports:
            raise ImportError("module " + args[0] + " is not available in the sandbox")

    sys.addaudithook(audit)

    # ---- comparisons as data (asserts `x == y` become __sandbox_cmp__('==', x, y))
    ops = {
        "==": operator.eq,
        "!=": operator.ne,
        "<": operator.lt,
        "<=": operator.le,
        ">": operator.gt,
        ">=": operator.ge,
    }
    scalars = (int, float, complex, bool, str, bytes, type(None))
    sequences = ((list, list.__iter__), (tuple, tuple.__iter__))
    sets = ((frozenset, frozenset.__iter__), (set, set.__iter__))

    def data(x, depth=0):
        """(plain builtin value, True), or (x, False) for an object that is not data. Subclasses
        and numpy values are converted through the base type, so an overridden __eq__ never
        decides a comparison with plain data."""
        t = type(x)
        if t in scalars:
            return x, True
        if depth > 200:
            return x, False
        for base, convert in (
            (int, int.__int__),
            (float, float.__float__),
            (str, str.__str__),
        ):
            if isinstance(x, base):
                return convert(x), True
        if isinstance(x, bytes):
            return b"".join([x]), True
        if isinstance(x, dict):
            out, good = {}, True
            for k, v in dict.items(x):
                (k, ok_k), (v, ok_v) = data(k, depth + 1), data(v, depth + 1)
                good = good and ok_k and ok_v
                if not good:
                    return x, False
                out[k] = v
            return out, True
        for base, iterate in sequences + sets:
            if isinstance(x, base):
                items = [data(v, depth + 1) for v in iterate(x)]
                if not all(good for _, good in items):
                    return x, False
                return base(v for v, _ in items), True
        if hasattr(t, "tolist"):  # numpy arrays and scalars
            return data(x.tolist(), depth + 1)
        if isinstance(x, Number):  # Fraction, Decimal, ...
            try:
                return data(complex(x) if isinstance(x, complex) else float(x), depth + 1)
            except BaseException:
                return x, False
        return x, False

    def compare(op, left, right):
        (a, a_data), (b_, b_data) = data(left), data(right)
        if a_data and b_data:
            return ops[op](a, b_)
        if a_data or b_data:  # data never equals, nor orders with, a non-data object
            return op == "!="
        return ops[op](left, right)  # two objects (e.g. ListNode): their own comparison

    # ---- the candidate
    try:
        code = compile(payload["program"], "<candidate>", "exec")
    except (SyntaxError, ValueError, OverflowError, MemoryError, RecursionError) as err:
        fail("syntax", describe(err))
    ns = {"__name__": "candidate", "__builtins__": b}
    try:
        exec(code, ns)
    except SystemExit as err:
        fail("exit", "SystemExit(" + describe(err) + ") while defining the candidate")
    except MemoryError as err:
        fail("memory", describe(err))
    except BaseException as err:
        fail("definition", describe(err))
    write(fd, b"Ds\n" if seccomp else b"D\n")

    # ---- one test: the candidate's names (except any that shadow a builtin) and pristine
    # builtins, so a redefined `sorted` or `len` cannot change the expected values.
    test_ns = {k: v for k, v in dict.items(ns) if type(k) is str and k not in pristine}
    test_ns.update(__builtins__=pristine, __name__="__test__", __sandbox_cmp__=compare)
    try:
        exec(compile(payload["test"], "<test>", "exec"), test_ns)
        if payload["entry_point"]:
            candidate = eval(payload["entry_point"], test_ns)
            dict.__getitem__(test_ns, "check")(candidate)
    except AssertionError as err:
        fail("assertion", describe(err))
    except SystemExit as err:
        fail("exit", "SystemExit(" + describe(err) + ") during the test")
    except MemoryError as err:
        fail("memory", describe(err))
    except BaseException as err:
        fail("error", describe(err))

    # ---- passed: no Python signal handler may run any more, then report and leave
    for signum in range(1, NSIG):
        try:  # noqa: SIM105  (contextlib is a module the candidate could have patched)
            sigfunc(signum, SIG_DFL)
        except BaseException:
            pass
    write(fd, ok)
    _exit(0)


if __name__ == "__main__":
    run()
