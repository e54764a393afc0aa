"""The child side of `qrpo.common.sandbox`, first half: launcher and PID-1 init (standard library).

The parent never imports this file: it passes its source to `python -c SOURCE SPEC`, so nothing
here depends on the parent's state. One test of one candidate is three processes:

    launch  session leader, started by the parent as root (or as the user, in a new user
            namespace): new mount, network, IPC, UTS and PID namespaces, a read-only view of
            the file system with a private tmpfs as the only writable place, then fork init
    init    PID 1 of the new PID namespace: a fresh read-only /proc, fork the runner, reap,
            exit with the runner's status (when PID 1 exits the kernel kills everything left
            in the namespace: forks that escaped the process group or the session included)
    runner  resource limits, no new privileges, drop to the sandbox uid, then exec a fresh
            interpreter on the source of `sandbox_runner.py` (which the spec carries): read
            the payload from stdin, harden the interpreter, define the candidate, run one test

The result channel is fd 3, one record per line, in this order:

    L{json}    from the launcher, before any candidate code exists: which layers are active
    D          the candidate's top-level code ran (later failures are per test)
    F{json}    the test failed, with the reason (the runner writes it; a candidate can write
               one too, which only hurts itself)
    P<nonce>   the test passed: the nonce arrives on stdin, which is closed before the
               candidate runs, and the parent counts a pass only with the right nonce and
               exit status 0; anything else on the channel is reported as a forged result
"""

import os
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_MOVE, MS_REC = 32, 1024, 2048, 4096, 8192, 16384
MS_PRIVATE, MS_RELATIME, MS_STRICTATIME = 1 << 18, 1 << 21, 1 << 24
# Per-mount flags that a bind remount must restate, or it would clear them.
MOUNT_OPTION_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
RESULT_FD = 3  # the result channel; sandbox_runner.py writes to the same number


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _mount(src, target, fstype, flags, data=None):
    ctypes, libc = _libc()

    def b(s):
        return None if s is None else s.encode()

    if libc.mount(b(src), b(target), b(fstype), flags, b(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {src or ''} {target}: {os.strerror(err)}")


def _mountinfo() -> list[tuple[str, list[str]]]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            point = parts[4]
            for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
                point = point.replace(code, char)
            out.append((point, parts[5].split(",")))
    return out


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _hidden_dirs(spec: dict, root: bool) -> list[str]:
    """Directories covered by an empty tmpfs: the configured ones, plus (as root, where the
    runner drops to an unprivileged uid) the topmost ancestor of each path the interpreter
    needs that this uid could not enter (e.g. a pyenv under /root)."""
    hide = [os.path.realpath(h) for h in spec["hide"] if os.path.isdir(h)]
    if root:
        for path in spec["expose"]:
            parts = path.strip("/").split("/")
            for i in range(1, len(parts) + 1):
                ancestor = "/" + "/".join(parts[:i])
                try:
                    enterable = os.stat(ancestor).st_mode & 0o001
                except OSError:
                    break
                if not enterable:
                    hide.append(ancestor)
                    break
    out = []
    for h in sorted(set(hide), key=len):
        if h != "/" and not any(_inside(h, o) for o in out):
            out.append(h)
    return out


def _setup_mounts(spec: dict, layers: dict, root: bool) -> None:
    workdir = spec["workdir"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    # Hide: bind what the interpreter needs aside, cover the directory with an empty tmpfs,
    # recreate the needed paths in it and move the binds back.
    for h in _hidden_dirs(spec, root):
        if _inside(workdir, h) or _inside(h, workdir):
            continue
        stages = []
        for i, path in enumerate(p for p in spec["expose"] if _inside(p, h) and os.path.isdir(p)):
            stage = os.path.join(workdir, f".stage{i}")
            os.mkdir(stage, 0o700)
            _mount(path, stage, None, MS_BIND | MS_REC)
            stages.append((stage, path))
        _mount("tmpfs", h, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=64k,nr_inodes=256")
        for stage, path in stages:
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(stage, path, None, MS_MOVE)
            os.rmdir(stage)
        layers["hidden"].append(h)
    # The only writable place: a small private tmpfs on the work directory, owned by the
    # sandbox uid; it disappears with the namespace, so nothing is left on the host's disk.
    owner = f",uid={spec['uid']},gid={spec['gid']}" if spec["uid"] is not None else ""
    _mount(
        "tmpfs",
        workdir,
        "tmpfs",
        MS_NOSUID | MS_NODEV,
        f"mode=700,size={spec['tmpfs_kb']}k,nr_inodes={spec['tmpfs_inodes']}{owner}",
    )
    # Everything else read-only (restating each mount's own flags, which a bind remount
    # would otherwise clear).
    for point, options in _mountinfo():
        if point == workdir:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        for opt in options:
            flags |= MOUNT_OPTION_FLAGS.get(opt, 0)
        try:
            _mount(None, point, None, flags)
        except OSError as err:
            if point == "/":
                raise
            layers["errors"].append(str(err))
    layers["ro_fs"] = bool(os.statvfs("/").f_flag & os.ST_RDONLY)
    os.chdir(workdir)  # the old cwd is the directory under the tmpfs


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _user_processes(uid: int) -> int:
    n = 0
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.stat(f"/proc/{name}").st_uid == uid:
                    n += 1
            except OSError:
                pass
    return n


def launch() -> None:
    import json
    import resource  # noqa: F401  (everything the launcher needs is imported before the
    # mounts: its own interpreter's files may be hidden from then on)

    _libc()
    spec = json.loads(sys.argv[1])
    if spec["fd"] != RESULT_FD:
        os.dup2(spec["fd"], RESULT_FD)
        os.close(spec["fd"])
    root = os.geteuid() == 0
    layers = {
        "root": root,
        "uid": spec["uid"],
        "userns": False,
        "netns": False,
        "mountns": False,
        "pidns": False,
        "ro_fs": False,
        "hidden": [],
        "errors": [],
    }
    if not root:
        # Without a uid of its own the candidate shares the user's process count.
        spec["nproc"] += _user_processes(os.getuid())
    if spec["namespaces"]:
        ctypes, libc = _libc()
        flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID
        uid, gid = os.getuid(), os.getgid()
        if libc.unshare(flags | (0 if root else CLONE_NEWUSER)) != 0:
            layers["errors"].append(f"unshare: {os.strerror(ctypes.get_errno())}")
        else:
            layers.update(netns=True, mountns=True, pidns=True, userns=not root)
            try:
                if not root:  # identity map: the same uid inside, capabilities until exec
                    for name, text in (
                        ("setgroups", "deny"),
                        ("uid_map", f"{uid} {uid} 1"),
                        ("gid_map", f"{gid} {gid} 1"),
                    ):
                        with open(f"/proc/self/{name}", "w") as f:
                            f.write(text)
                _setup_mounts(spec, layers, root)
            except OSError as err:
                layers["errors"].append(str(err))
    os.write(RESULT_FD, b"L" + json.dumps(layers).encode() + b"\n")
    pid = os.fork()
    if pid == 0:
        _init(spec, layers)
    os.close(0)  # the payload (and its nonce) is the runner's alone
    os._exit(_exit_code(os.waitpid(pid, 0)[1]))


def _init(spec: dict, layers: dict) -> None:
    """PID 1 of the namespace (or a plain parent without one): fork the runner and reap."""
    try:
        if layers["pidns"] and layers["mountns"]:
            try:
                _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
            except OSError as err:
                os.write(2, f"sandbox: fresh /proc not mounted ({err})\n".encode())
        pid = os.fork()
        if pid == 0:
            _exec_runner(spec)
        os.close(0)
        while True:  # as PID 1, orphans of the candidate are reparented here
            done, status = os.waitpid(-1 if layers["pidns"] else pid, 0)
            if done == pid:
                os._exit(_exit_code(status))
    except BaseException as err:
        os.write(2, f"sandbox init: {err!r}\n".encode())
        os._exit(71)


def _exec_runner(spec: dict) -> None:
    import json
    import resource

    try:
        ctypes, libc = _libc()
        os.closerange(RESULT_FD + 1, 65536)
        cpu = spec["cpu_seconds"]
        for limit, value in (
            (resource.RLIMIT_CPU, (cpu, cpu + 1)),
            (resource.RLIMIT_AS, (spec["memory_bytes"],) * 2),
            (resource.RLIMIT_NPROC, (spec["nproc"],) * 2),
            (resource.RLIMIT_FSIZE, (spec["fsize_bytes"],) * 2),
            (resource.RLIMIT_NOFILE, (spec["nofile"],) * 2),
            (resource.RLIMIT_CORE, (0, 0)),
        ):
            resource.setrlimit(limit, value)
        if spec["uid"] is not None:
            os.setgroups([])
            os.setgid(spec["gid"])
            os.setuid(spec["uid"])
        libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)  # after setuid, which clears it
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        os.chdir(spec["workdir"])
        python = spec["python"]
        flags = "-IB" if spec["site_packages"] else "-IBS"
        os.execve(python, [python, flags, "-c", spec["runner_source"]], spec["env"])
    except BaseException as err:
        record = {"kind": "harness", "detail": f"runner set-up failed: {err!r}"}
        os.write(RESULT_FD, b"F" + json.dumps(record).encode() + b"\n")
    os._exit(70)


if __name__ == "__main__":
    launch()
