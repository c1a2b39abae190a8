"""Run untrusted Python (model-written code) in a separate, locked-down process.

Every program runs in a fresh child process; the calling process never executes it.
The child is started through a small *launcher* -- this very file run as a script by
the trusted interpreter -- which applies the isolation and then ``execve``s the
sandbox interpreter on the program, so nothing of the parent's memory is shared:

* resource limits (``setrlimit``): address space, CPU seconds, file size, open files,
  processes/threads, no core dumps; plus a wall-clock timeout and a cap on captured
  stdout/stderr, both enforced by the parent, which then kills everything the program started;
* a stripped environment (``PATH``, ``HOME``, ``TMPDIR``, ``LANG``, ``LC_ALL`` only), a
  private, empty working directory and no stdin; the interpreter runs with ``-I -S -B``
  (no ``PYTHON*`` variables, no site-packages, no bytecode writes);
* when the parent is root: a throw-away user id (random, unused, no groups) so the program
  cannot write the project tree, read root-only files or the parent's ``/proc/<pid>/environ``,
  or signal the parent; every process left with that uid is killed after the run;
* Linux namespaces where the kernel allows them (root, or an unprivileged user namespace
  otherwise): network (no interface up), IPC, pid (the program is pid 1: when it ends,
  everything it started ends) and mount, where ``/tmp``, ``/var/tmp``, ``/dev/shm`` and
  ``/run/lock`` are fresh size-limited tmpfs mounts and ``/proc`` shows only the sandbox;
* ``no_new_privs`` (set-uid binaries such as ``su`` cannot raise privileges) and a seccomp
  filter that refuses ``socket()`` for every family but ``AF_UNIX`` -- the network stays
  closed where namespaces are not allowed -- and, when the program would share the caller's
  uid and pid namespace, refuses signals, ``ptrace`` and leaving the process group.

``SandboxResult.isolation`` lists the layers that were actually applied. See
``docs/sandbox.md`` for what this does and does not guarantee.
"""

from __future__ import annotations

# The launcher (bottom half of this section) runs this file as a script in every child, so
# the imports it needs come first and the parent-only ones are loaded after its entry point.
import ctypes
import math
import os
import resource
import struct
import sys

__all__ = ["SandboxError", "SandboxResult", "run_many", "run_python"]

# Directories any user may write to; they get private tmpfs mounts (or are cleaned after the run).
WORLD_WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
PYTHON_FLAGS = ("-I", "-S", "-B")  # isolated mode, no site-packages, no .pyc writes
LAUNCHER_FAILED = 120  # launcher exit code when the isolation could not be set up


def _child_env(home: str) -> dict:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": home,
        "TMPDIR": home,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
    }


def _process_uids():
    """(pid, real uid) for every live (non-zombie) process visible in /proc."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as handle:
                for line in handle:
                    if line.startswith(b"State:") and line.split()[1] in (b"Z", b"X"):
                        break  # already dead, waiting to be reaped
                    if line.startswith(b"Uid:"):
                        yield int(entry), int(line.split()[1])
                        break
        except (OSError, ValueError, IndexError):
            continue


# ----------------------------------------------------------------------------- launcher side
# Everything below runs in the child, in a fresh single-threaded interpreter, before the
# program's interpreter is exec'ed. Only the standard library is available here.

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = (
    0x00020000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x4000, 0x40000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 1, 38, 22, 2
SIGKILL = 9
NAMESPACES = {  # unshare flag -> name reported in SandboxResult.isolation
    CLONE_NEWNET: "network-namespace",
    CLONE_NEWIPC: "ipc-namespace",
    CLONE_NEWNS: "mount-namespace",
    CLONE_NEWPID: "pid-namespace",
}


def _launch(config: dict) -> None:
    """Isolate this process, then exec the sandbox interpreter on the program. Never returns."""
    status_fd = config["status_fd"]
    os.set_inheritable(status_fd, False)  # closes on exec: the program never sees it
    isolation = []

    def report(kind, text):  # one "kind<TAB>text" line per event, read by the parent
        os.write(status_fd, f"{kind}\t{' '.join(text.split())}\n".encode())

    try:
        with open(config["program"], "rb") as handle:
            program = handle.read()
        uid = config["uid"]
        # RLIMIT_NPROC counts every task of the user: a caller that keeps its uid already has some
        # (counted here, before a pid namespace would hide them).
        tasks_already_running = 0 if uid is not None else _count_own_tasks()
        libc = _libc()
        if config.get("namespaces", 1):
            isolation += _unshare(libc, as_root=uid is not None)
        if "pid-namespace" in isolation:
            # The first child becomes pid 1 of the new namespace: when it dies, the kernel kills
            # every process left in there. This process stays outside to report its exit status.
            child = os.fork()
            if child:
                _, wait_status, usage = os.wait4(child, 0)
                report("exit", str(os.waitstatus_to_exitcode(wait_status)))
                report("cpu", str(usage.ru_utime + usage.ru_stime))
                os._exit(0)
            libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)  # killing the launcher kills the sandbox
            os.setsid()  # a kill(0) from the program must not reach the launcher
        workdir = None
        if "mount-namespace" in isolation:
            try:
                isolation += _mount_private_dirs(libc, config["disk_mb"], new_proc="pid-namespace" in isolation)
                workdir = "/tmp/sandbox"
            except OSError:
                pass  # no private /tmp: fall back to a work dir on the host, cleaned up by the parent
        if workdir is None:
            os.chmod(config["host_dir"], 0o711)  # traversable, not listable
            workdir = os.path.join(config["host_dir"], "work")
        os.mkdir(workdir, 0o700)
        program_path = os.path.join(workdir, "program.py")
        with open(program_path, "wb") as handle:
            handle.write(program)
        _set_rlimits(config, tasks_already_running)
        isolation.append("rlimits")
        if uid is not None:
            os.chown(workdir, uid, uid)
            os.chown(program_path, uid, uid)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            isolation.append("unprivileged-uid")
            if "pid-namespace" in isolation:
                libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)  # a uid change cleared it
        os.chdir(workdir)
        shares_parent = uid is None and "pid-namespace" not in isolation  # same uid, same pids
        isolation += _restrict_syscalls(libc, guard_parent=shares_parent)
        report("ready", ",".join(isolation))
        python = config["python"]
        os.execve(python, [python, *PYTHON_FLAGS, program_path], _child_env(workdir))
    except BaseException as exc:  # report any setup failure to the parent, then exit
        report("error", f"{type(exc).__name__}: {exc}")
        os._exit(LAUNCHER_FAILED)


def _set_rlimits(config: dict, tasks_already_running: int) -> None:
    memory = config["memory_mb"] * 2**20
    cpu = math.ceil(config["cpu_seconds"])
    limits = {
        "RLIMIT_AS": (memory, memory),
        "RLIMIT_DATA": (memory, memory),
        "RLIMIT_CPU": (cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL one second later
        "RLIMIT_FSIZE": (config["max_file_bytes"],) * 2,
        "RLIMIT_CORE": (0, 0),
        "RLIMIT_NOFILE": (256, 256),
    }
    processes = config["max_processes"] + tasks_already_running
    limits["RLIMIT_NPROC"] = (processes, processes)
    for name, (soft, hard) in limits.items():
        if hasattr(resource, name):
            which = getattr(resource, name)
            _, current_hard = resource.getrlimit(which)
            if current_hard != resource.RLIM_INFINITY:
                soft, hard = min(soft, current_hard), min(hard, current_hard)
            resource.setrlimit(which, (soft, hard))


def _count_own_tasks() -> int:
    uid, total = os.getuid(), 0
    for pid, owner in _process_uids():
        if owner != uid:
            continue
        try:
            total += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            total += 1
    return total


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _unshare(libc, as_root: bool) -> list[str]:
    """Enter new network / IPC / mount / pid namespaces where allowed; returns the ones entered.

    Root may create them directly; other users need an unprivileged user namespace first
    (mapping their own uid only), which many kernels allow and many containers forbid.
    """
    if libc is None:
        return []
    wanted = 0
    for flag in NAMESPACES:
        wanted |= flag
    if not as_root:
        uid, gid = os.getuid(), os.getgid()
        if libc.unshare(CLONE_NEWUSER | wanted) != 0:
            return []
        for path, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{path}", "w") as handle:
                handle.write(text)
        return ["user-namespace", *NAMESPACES.values()]
    if libc.unshare(wanted) == 0:
        return list(NAMESPACES.values())
    return [name for flag, name in NAMESPACES.items() if libc.unshare(flag) == 0]


def _mount_private_dirs(libc, disk_mb: int, new_proc: bool) -> list[str]:
    """Fresh size-limited tmpfs on every world-writable dir; a /proc showing only the sandbox."""

    def mount(source, target, fstype, flags, data):
        args = [None if v is None else v.encode() for v in (source, target, fstype, data)]
        if libc.mount(args[0], args[1], args[2], ctypes.c_ulong(flags), args[3]) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"mount {target}: {os.strerror(errno)}")

    mount(None, "/", None, MS_REC | MS_PRIVATE, None)  # nothing mounted here propagates to the host
    for directory in WORLD_WRITABLE_DIRS:
        if os.path.isdir(directory) and not os.path.islink(directory):
            try:
                mount("tmpfs", directory, "tmpfs", MS_NOSUID | MS_NODEV, f"size={disk_mb}m,mode=1777")
            except OSError:
                if directory == "/tmp":  # the work dir lives there; the others are best-effort
                    raise
    applied = ["private-tmpfs"]
    if new_proc:
        try:  # refused in containers that mask parts of /proc; the pid namespace still holds
            mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
            applied.append("private-proc")
        except OSError:
            pass
    return applied


# Syscall numbers per machine: the AUDIT_ARCH value, then the calls the filter looks at.
# io_uring_setup (425), pidfd_send_signal (424) and pidfd_getfd (438) are the same on both.
_SYSCALLS = {
    "x86_64": dict(arch=0xC000003E, socket=41, prctl=157, kill=62, tkill=200, tgkill=234, rt_sigqueueinfo=129,
                   rt_tgsigqueueinfo=297, ptrace=101, process_vm_readv=310, process_vm_writev=311, setsid=112,
                   setpgid=109),
    "aarch64": dict(arch=0xC00000B7, socket=198, prctl=167, kill=129, tkill=130, tgkill=131, rt_sigqueueinfo=138,
                    rt_tgsigqueueinfo=240, ptrace=117, process_vm_readv=270, process_vm_writev=271, setsid=157,
                    setpgid=154),
}
_SYSCALLS["amd64"], _SYSCALLS["arm64"] = _SYSCALLS["x86_64"], _SYSCALLS["aarch64"]


def _seccomp_filter(guard_parent: bool) -> bytes | None:
    """Classic-BPF seccomp program, or None on an architecture it does not know.

    Refused with EPERM: ``socket()`` for any family but AF_UNIX (no network even without a
    network namespace), ``io_uring_setup`` (could open sockets behind the filter's back),
    ``prctl(PR_SET_PDEATHSIG)`` (would let pid 1 outlive the launcher) and x32 syscalls;
    a foreign ABI (e.g. 32-bit ``int 0x80``) kills the process. With `guard_parent` (the
    program shares the caller's uid and pid namespace) also every signal sent to another
    process (``kill`` is allowed only for pid 0, its own process group), ``ptrace`` and
    ``process_vm_*``, which would otherwise reach the caller, and ``setsid`` / ``setpgid``, so
    that every descendant stays in the process group the caller kills at the end.
    """
    numbers = _SYSCALLS.get(os.uname().machine.lower())
    if numbers is None:
        return None
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    allow, deny, kill = 0x7FFF0000, 0x00050000 | 1, 0x80000000  # ALLOW, ERRNO(EPERM), KILL_PROCESS
    arch, nr, arg0 = 4, 0, 16  # offsets in struct seccomp_data (arg0: its low 32 bits)
    denied = [425]  # io_uring_setup
    if guard_parent:
        denied += [424, 438] + [numbers[name] for name in (
            "tkill", "tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "ptrace", "process_vm_readv",
            "process_vm_writev", "setsid", "setpgid")]
    # (code, jump-if-true, jump-if-false, k), optionally preceded by a label; jumps may name a label.
    program = [
        (ld, 0, 0, arch),
        (jeq, "native", "kill", numbers["arch"]),
        ("kill", ret, 0, 0, kill),
        ("native", ld, 0, 0, nr),
        (jge, "deny", 0, 0x40000000),  # x32 ABI
        *[(jeq, "deny", 0, number) for number in denied],
        (jeq, "prctl", 0, numbers["prctl"]),
        *([(jeq, "kill_arg", 0, numbers["kill"])] if guard_parent else []),
        (jeq, 0, "allow", numbers["socket"]),
        (ld, 0, 0, arg0),
        (jeq, "allow", "deny", 1),  # AF_UNIX
        ("prctl", ld, 0, 0, arg0),
        (jeq, "deny", "allow", PR_SET_PDEATHSIG),
        ("kill_arg", ld, 0, 0, arg0),
        (jeq, "allow", "deny", 0),  # kill(0, sig): its own process group
        ("allow", ret, 0, 0, allow),
        ("deny", ret, 0, 0, deny),
    ]
    labels = {ins[0]: i for i, ins in enumerate(program) if isinstance(ins[0], str)}
    code = b""
    for i, ins in enumerate(program):
        op, jt, jf, k = ins[1:] if isinstance(ins[0], str) else ins
        jt, jf = (labels[j] - i - 1 if isinstance(j, str) else j for j in (jt, jf))
        code += struct.pack("=HBBI", op, jt, jf, k)
    return code


def _restrict_syscalls(libc, guard_parent: bool) -> list[str]:
    """no_new_privs (set-uid binaries cannot raise privileges) and the seccomp filter."""
    if libc is None or libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        return []
    code = _seccomp_filter(guard_parent)
    if code is None:
        return ["no-new-privs"]
    buffer = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(code) // 8, ctypes.addressof(buffer))
    if libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        return ["no-new-privs"]
    return ["no-new-privs", "seccomp"] + (["seccomp-no-signals"] if guard_parent else [])


def _reap(uid: int) -> None:
    """Run as root by the parent: become ``uid`` and kill all of its processes."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    try:
        os.kill(-1, SIGKILL)  # every process of this uid except ourselves
    except ProcessLookupError:
        pass


def _parse_launcher_args(argv: list[str]) -> dict:
    """``key=value`` arguments from the parent (json would cost the launcher an import of ``re``)."""
    config = dict(arg.split("=", 1) for arg in argv)
    for key in ("status_fd", "memory_mb", "max_processes", "max_file_bytes", "disk_mb", "namespaces", "reap_uid"):
        if key in config:
            config[key] = int(config[key])
    config["uid"] = int(config["uid"]) if config.get("uid") else None
    if "cpu_seconds" in config:
        config["cpu_seconds"] = float(config["cpu_seconds"])
    return config


def _launcher_command(**config) -> list[str]:
    args = [f"{key}={'' if value is None else value}" for key, value in config.items()]
    return [sys.executable, *PYTHON_FLAGS, os.path.abspath(__file__), *args]


if __name__ == "__main__":
    _config = _parse_launcher_args(sys.argv[1:])
    if "reap_uid" in _config:
        _reap(_config["reap_uid"])
    else:
        _launch(_config)  # never returns: execs the program or exits
    sys.exit(0)


# ----------------------------------------------------------------------------- parent side
# Imported here, after the launcher's entry point, so that sandbox start-up stays fast.
import random  # noqa: E402
import selectors  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

_UID_RANGE = (1_000_000, 2_000_000_000)  # throw-away uids when running as root
# Uncaught errors (last line of stderr) that mean a sandbox limit was hit, not a wrong program.
RESOURCE_ERRORS = (
    ("MemoryError", "memory limit ({memory_mb} MiB)"),
    ("[Errno 27] File too large", "file size limit ({max_file_bytes} bytes)"),
    ("[Errno 28] No space left on device", "disk limit ({disk_mb} MiB tmpfs)"),
    ("can't start new thread", "process/thread limit ({max_processes})"),
    ("[Errno 11] Resource temporarily unavailable", "process/thread limit ({max_processes})"),
)


class SandboxError(RuntimeError):
    """The sandbox itself could not run (bad limits, no usable interpreter...)."""


@dataclass
class SandboxResult:
    """Outcome of one program.

    ``status`` is one of ``passed`` (exit code 0), ``failed`` (non-zero exit, e.g. an
    exception or a failing ``assert``), ``timeout`` (wall-clock or CPU limit), ``crashed``
    (killed by a signal, memory / file-size / output limit) or ``error`` (the sandbox
    could not start the program). ``reason`` says why in words.
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    reason: str
    duration: float
    output_truncated: bool = False
    isolation: tuple[str, ...] = field(default_factory=tuple)

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def run_python(
    code: str,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    max_output_bytes: int = 1_000_000,
    *,
    cpu_seconds: float | None = None,
    max_processes: int = 64,
    max_file_bytes: int = 16 * 2**20,
    disk_mb: int = 64,
    python: str | None = None,
) -> SandboxResult:
    """Run ``code`` as ``__main__`` in a sandboxed child process and report what happened.

    ``timeout`` is wall-clock seconds, ``memory_mb`` the address-space limit,
    ``max_output_bytes`` the cap on each of stdout and stderr, ``cpu_seconds`` the CPU
    limit per process (default: ``timeout`` rounded up, plus one), ``max_processes`` the
    limit on processes+threads, ``max_file_bytes`` the largest file it may write and
    ``disk_mb`` the size of its private tmpfs mounts. ``python`` picks the interpreter
    that runs the program (default: the first of this interpreter, ``/usr/bin/python3``...
    that the sandbox user can run; ``TRL_BRIDGE_SANDBOX_PYTHON`` overrides).
    """
    if not isinstance(code, str):
        raise TypeError(f"code must be a str, got {type(code).__name__}")
    limits = _check_limits(
        timeout=timeout,
        memory_mb=memory_mb,
        max_output_bytes=max_output_bytes,
        cpu_seconds=cpu_seconds,
        max_processes=max_processes,
        max_file_bytes=max_file_bytes,
        disk_mb=disk_mb,
    )
    return _run(code, limits, *_sandbox_setup(python))


def run_many(codes, max_workers: int | None = None, **limits) -> list[SandboxResult]:
    """Run several programs (each in its own sandbox) on a thread pool; results keep the input order.

    ``max_workers`` defaults to the number of CPU cores; ``limits`` are ``run_python``'s keywords.
    """
    codes = list(codes)
    if max_workers is None:
        max_workers = os.cpu_count() or 1
    if not isinstance(max_workers, int) or max_workers < 1:
        raise ValueError(f"max_workers must be a positive integer, got {max_workers!r}")
    if not codes:
        return []
    _sandbox_setup(limits.get("python"))  # probe once here rather than in every thread
    with ThreadPoolExecutor(max_workers=min(max_workers, len(codes))) as pool:
        return list(pool.map(lambda code: run_python(code, **limits), codes))


def _check_limits(**limits) -> dict:
    def positive_number(name):
        value = limits[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
            raise ValueError(f"{name} must be a positive number, got {value!r}")

    def integer_at_least(name, low):
        value = limits[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

    positive_number("timeout")
    integer_at_least("memory_mb", 32)  # the interpreter alone needs ~20 MiB of address space
    integer_at_least("max_output_bytes", 0)
    integer_at_least("max_processes", 1)
    integer_at_least("max_file_bytes", 0)
    integer_at_least("disk_mb", 1)
    if limits["cpu_seconds"] is None:
        limits["cpu_seconds"] = math.ceil(limits["timeout"]) + 1
    positive_number("cpu_seconds")
    return limits


_setup_lock = threading.Lock()
_setup_cache: dict[str | None, tuple[str, bool]] = {}


def _sandbox_setup(python: str | None) -> tuple[str, bool]:
    """(interpreter, use namespaces): the first interpreter the sandbox user can start, probed once.

    Namespaces are tried first; where they are allowed but unusable (a user namespace without
    capabilities, a mount refused by a security module...) the sandbox goes on without them.
    """
    with _setup_lock:
        if python in _setup_cache:
            return _setup_cache[python]
        override = os.environ.get("TRL_BRIDGE_SANDBOX_PYTHON")
        candidates = [python] if python else [override] if override else _interpreter_candidates()
        limits = _check_limits(
            timeout=20.0, memory_mb=512, max_output_bytes=10_000, cpu_seconds=None,
            max_processes=8, max_file_bytes=2**20, disk_mb=1,
        )
        failures = []
        for namespaces in (True, False):
            for candidate in candidates:
                probe = _run("import sys; print(sys.version_info[0])", limits, candidate, namespaces)
                if probe.status == "passed" and probe.stdout.strip() == "3":
                    _setup_cache[python] = (candidate, namespaces)
                    return candidate, namespaces
                failures.append(f"{candidate} ({'with' if namespaces else 'without'} namespaces): "
                                f"{probe.status}, {probe.reason}")
        raise SandboxError(
            "no Python interpreter can be started by the sandbox user; tried "
            + "; ".join(failures)
            + ". Set TRL_BRIDGE_SANDBOX_PYTHON to a python3 that every user may read and execute."
        )


def _interpreter_candidates() -> list[str]:
    names = [sys.executable, getattr(sys, "_base_executable", ""), os.path.realpath(sys.executable)]
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    for directory in ("/usr/local/bin", "/usr/bin", "/bin"):
        names += [os.path.join(directory, version), os.path.join(directory, "python3")]
    seen, out = set(), []
    for name in names:
        if name and name not in seen and os.path.isfile(name):
            seen.add(name)
            out.append(name)
    return out


def _run(code: str, limits: dict, python: str, namespaces: bool) -> SandboxResult:
    if not (sys.platform.startswith("linux") or sys.platform == "darwin"):
        raise SandboxError(f"the sandbox needs a POSIX system (Linux recommended), not {sys.platform}")
    as_root = os.geteuid() == 0
    uid = _free_uid() if as_root else None
    host_dir = tempfile.mkdtemp(prefix="trl_bridge_sandbox_")
    status_read, status_write = os.pipe()
    started = time.monotonic()
    proc = None
    try:
        program_path = os.path.join(host_dir, "program.py")
        with open(program_path, "w", encoding="utf-8") as handle:
            handle.write(code)
        command = _launcher_command(
            python=python,
            program=program_path,
            host_dir=host_dir,
            uid=uid,
            namespaces=int(namespaces),
            status_fd=status_write,
            **{k: limits[k] for k in ("memory_mb", "cpu_seconds", "max_processes", "max_file_bytes", "disk_mb")},
        )
        try:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=_child_env("/nonexistent"),
                cwd="/",
                pass_fds=(status_write,),
                start_new_session=True,
            )
        except OSError as exc:
            return SandboxResult("error", None, "", "", f"could not start the launcher: {exc}",
                                 time.monotonic() - started)
        os.close(status_write)
        status_write = -1
        captured = _supervise(proc, status_read, started + limits["timeout"], limits["max_output_bytes"], uid)
        duration = time.monotonic() - started
        return _classify(proc.returncode, captured, duration, limits)
    finally:
        if status_write >= 0:
            os.close(status_write)
        os.close(status_read)
        if proc is not None and proc.returncode is None:
            _kill_group(proc.pid)
            proc.wait()
        if uid is not None:
            _kill_uid(uid)
            _remove_files_owned_by(uid)
        shutil.rmtree(host_dir, ignore_errors=True)


def _supervise(proc, status_read: int, deadline: float, cap: int, uid: int | None) -> dict:
    """Collect output until the program exits, the deadline passes or the output cap is hit."""
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    buffers = {out_fd: bytearray(), err_fd: bytearray(), status_read: bytearray()}
    selector = selectors.DefaultSelector()
    for fd in buffers:
        os.set_blocking(fd, False)
        selector.register(fd, selectors.EVENT_READ)
    pidfd = _pidfd_open(proc.pid)
    if pidfd is not None:
        selector.register(pidfd, selectors.EVENT_READ)
    timed_out = overflow = False

    def read_ready(timeout):
        nonlocal overflow
        for key, _ in selector.select(timeout):
            if key.fd == pidfd:
                continue
            try:
                chunk = os.read(key.fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                selector.unregister(key.fd)
                continue
            buffer = buffers[key.fd]
            limit = 65536 if key.fd == status_read else cap
            room = limit - len(buffer)
            buffer += chunk[:room]
            if len(chunk) > room and key.fd != status_read:
                overflow = True

    try:
        while not _has_exited(proc.pid) and not overflow:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            read_ready(min(remaining, 0.05) if pidfd is None else remaining)
        # The program is done (or must stop). Kill whatever it left behind -- before reaping
        # it, so its pid (= the group id) cannot have been reused -- then drain the pipes.
        _kill_group(proc.pid)
        if uid is not None:
            _kill_uid(uid)
        proc.wait()
        if pidfd is not None:
            selector.unregister(pidfd)
        drain_deadline = time.monotonic() + 1.0
        while selector.get_map() and not overflow:
            remaining = drain_deadline - time.monotonic()
            if remaining <= 0:
                break
            read_ready(remaining)
    finally:
        selector.close()
        if pidfd is not None:
            os.close(pidfd)
        proc.stdout.close()
        proc.stderr.close()
    status_lines = bytes(buffers[status_read]).decode("utf-8", "replace").splitlines()
    launcher = dict(line.split("\t", 1) for line in status_lines if "\t" in line)
    return {
        "stdout": bytes(buffers[out_fd]),
        "stderr": bytes(buffers[err_fd]),
        "timed_out": timed_out,
        "overflow": overflow,
        "launcher": launcher,
    }


def _classify(returncode: int, captured: dict, duration: float, limits: dict) -> SandboxResult:
    stdout = captured["stdout"].decode("utf-8", "replace")
    stderr = captured["stderr"].decode("utf-8", "replace")
    launcher = captured["launcher"]
    if "exit" in launcher:  # the program ran as pid 1 of a namespace; the launcher relayed its status
        returncode = int(launcher["exit"])
    isolation = tuple(filter(None, launcher.get("ready", "").split(",")))

    def result(status, reason):
        return SandboxResult(status, returncode, stdout, stderr, reason, duration, captured["overflow"], isolation)

    if "error" in launcher:
        return result("error", f"sandbox setup failed: {launcher['error']}")
    if "ready" not in launcher:
        return result("error", f"sandbox launcher exited with code {returncode} before starting the program")
    if captured["timed_out"]:
        return result("timeout", f"wall-clock timeout after {limits['timeout']:g}s")
    if captured["overflow"]:
        return result("crashed", f"output limit exceeded ({limits['max_output_bytes']} bytes per stream); killed")
    if returncode == 0:
        return result("passed", "exit code 0")
    if returncode < 0:
        sig = -returncode
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
        cpu_used = float(launcher.get("cpu", 0))
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_used >= limits["cpu_seconds"]):
            return result("timeout", f"CPU time limit exceeded ({limits['cpu_seconds']:g}s, {name})")
        if sig == signal.SIGXFSZ:
            return result("crashed", f"file size limit exceeded ({limits['max_file_bytes']} bytes, {name})")
        if sig == signal.SIGKILL:
            return result("crashed", f"killed by {name} (out of memory, or killed itself)")
        return result("crashed", f"killed by {name}")
    last_line = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), "")
    for marker, limit in RESOURCE_ERRORS:
        if marker in last_line:
            return result("crashed", f"{limit.format(**limits)} exceeded: {last_line[:500]}")
    return result("failed", f"exit code {returncode}" + (f": {last_line[:500]}" if last_line else ""))


def _has_exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it (its pid stays reserved)."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _pidfd_open(pid: int):
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _free_uid() -> int:
    """A random uid no process is using, inside the range this user namespace maps."""
    ranges = []
    try:
        with open("/proc/self/uid_map") as handle:
            for line in handle:
                inside, _, count = (int(x) for x in line.split())
                low, high = max(inside, _UID_RANGE[0]), min(inside + count - 1, _UID_RANGE[1])
                if low <= high:
                    ranges.append((low, high))
                elif inside + count - 1 > 10_000:  # small namespace (e.g. 0-65535): use its top part
                    ranges.append((max(inside, 10_000), inside + count - 2))
    except OSError:
        ranges = [_UID_RANGE]
    if not ranges:
        raise SandboxError("no unprivileged uid is mapped in this user namespace; cannot drop privileges")
    used = _uids_in_use()
    for _ in range(100):
        low, high = random.SystemRandom().choice(ranges)
        uid = random.SystemRandom().randint(low, high)
        if uid not in used:
            return uid
    raise SandboxError("could not find an unused uid for the sandbox")


def _uids_in_use() -> set[int]:
    return {uid for _, uid in _process_uids()}


def _kill_uid(uid: int) -> None:
    """Kill every process of the throw-away ``uid`` (also those that left the process group)."""
    for _ in range(10):
        if not any(owner == uid for _, owner in _process_uids()):
            return
        # kill(-1) run *as uid* reaches all of its processes atomically, even while they fork.
        subprocess.run(
            _launcher_command(reap_uid=uid),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=_child_env("/nonexistent"), cwd="/", timeout=30,
        )


def _remove_files_owned_by(uid: int) -> None:
    """Without a private mount namespace the program may have left files in world-writable dirs."""
    for directory in WORLD_WRITABLE_DIRS:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                pass
