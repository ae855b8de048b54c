"""Running one generated Python program: a fresh interpreter with limits, its own directory, and no trainer state.

Every run starts ``sys.executable -I -B`` (isolated mode: no ``PYTHON*`` variables, no user site, no script directory
on ``sys.path``), never a fork of the trainer: the launcher (``_launcher.py``, passed as ``-c`` text) sets the
resource limits from inside the new interpreter. Each run gets:

- limits on address space, CPU seconds, processes (tasks, threads included), file size; no core files;
- a wall-clock deadline, after which the whole process group is killed (the program runs in a new session);
- its own temporary working directory, also its ``HOME`` and ``TMPDIR``, removed afterwards;
- an environment holding none of the trainer's variables: a minimal ``PATH``, ``HOME``, ``TMPDIR``, ``LANG`` and
  one-thread settings for numeric libraries;
- stdout and stderr read through pipes, at most ``Limits.output_bytes`` together: past that the program is killed.

Isolation ``"bwrap"`` adds bubblewrap's namespaces: no network (a new network namespace), its own process tree
(nothing of the trainer can be signalled; killing bubblewrap ends every process inside), a read-only view of the
system in which ``/tmp``, ``/var/tmp`` and the trainer's home are empty, and only the working directory writable.
Run as root, the program then drops to uid/gid 65534 (nobody) inside, so the kernel enforces the process limit
(it never limits root) and no capability is left. Isolation ``"process"`` is the plain process with the limits above:
it does not stop network access, writes or deletions wherever the trainer's user may write, or signals to the
trainer's processes; as root the kernel does not enforce the process limit. ``"auto"`` takes ``"bwrap"`` where a
trial run through it works, else ``"process"`` with a warning.
"""

from __future__ import annotations

import functools
import marshal
import math
import os
import selectors
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

ISOLATIONS = ("auto", "bwrap", "process")
NOBODY = 65534  # the uid and gid a root sandbox runs the program as
_LAUNCHER = (Path(__file__).parent / "_launcher.py").read_text()
_STDERR_KEPT = 4096  # head of stderr kept for the verdict's detail
_WORKDIR_PREFIX = "trd-code-"


@dataclass(frozen=True)
class Limits:
    """Resources of one program run.

    Args:
        seconds: Wall-clock limit per test case; a process running several cases gets this much per case.
        startup_seconds: Extra wall-clock time per process for the interpreter's start and the program's imports.
        memory_bytes: Address-space limit (``RLIMIT_AS``).
        processes: Tasks (processes and threads) the program may run at once, itself included (``RLIMIT_NPROC``).
        file_bytes: Largest file the program may write (``RLIMIT_FSIZE``).
        output_bytes: Bytes of stdout and stderr read before the program is killed and fails.
    """

    seconds: float = 4.0
    startup_seconds: float = 2.0
    memory_bytes: int = 2 << 30
    processes: int = 16
    file_bytes: int = 16 << 20
    output_bytes: int = 16 << 20

    def __post_init__(self) -> None:
        for name in ("seconds", "startup_seconds", "memory_bytes", "processes", "file_bytes", "output_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Limits.{name} must be positive, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class Run:
    """What one program run did.

    Attributes:
        returncode: The exit status (negative: the signal that ended it); None when the sandbox killed it.
        stdout: Everything it wrote to stdout (at most ``Limits.output_bytes``).
        stderr: The head of its stderr.
        timed_out: It ran past its wall-clock deadline.
        output_exceeded: It wrote more than ``Limits.output_bytes``.
        stopped: The caller's ``watch`` stopped it early, or (a later job of :func:`run_together`) it was still
            running when the first job ended.
    """

    returncode: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool = False
    output_exceeded: bool = False
    stopped: bool = False

    @property
    def out_of_time(self) -> bool:
        """Killed by the wall-clock deadline or the CPU limit (SIGXCPU, then SIGKILL at the hard limit)."""
        return self.timed_out or self.returncode in (-signal.SIGXCPU, -signal.SIGKILL)


@dataclass(frozen=True)
class Job:
    """One interpreter of a run.

    Attributes:
        files: File name to text, written into its own working directory.
        script: The file to run as ``__main__``.
        stdin: Text on its stdin (a file, so a program that never reads it cannot block the writer); None: empty.
        pass_fds: Descriptors it inherits under the same numbers (a socket to another job); handed over: the run
            closes them in this process once its jobs have started.
    """

    files: Mapping[str, str]
    script: str
    stdin: str | None = None
    pass_fds: tuple[int, ...] = ()


def run_python(
    files: Mapping[str, str],
    script: str,
    limits: Limits,
    seconds: float,
    isolation: str,
    stdin: str | None = None,
    watch: Callable[[bytes], bool] | None = None,
) -> Run:
    """Run ``script`` (one of ``files``) in a fresh sandboxed interpreter.

    Args:
        files: File name to text, written into the run's working directory.
        script: The file to run as ``__main__``.
        limits: Resources of the run.
        seconds: Wall-clock deadline of this process (the caller adds one case's limit per case it runs).
        isolation: ``"bwrap"`` or ``"process"`` (see the module docstring); resolve ``"auto"`` with
            :func:`resolve_isolation` first.
        stdin: Text on the program's stdin (a file, so a program that never reads it cannot block the writer);
            None gives an empty stdin.
        watch: Called with all stdout so far after each chunk read; returning False kills the program (early exit
            on a first wrong answer).
    """
    return run_together([Job(files, script, stdin)], limits, seconds, isolation, watch)[0]


def run_together(
    jobs: Sequence[Job],
    limits: Limits,
    seconds: float,
    isolation: str,
    watch: Callable[[bytes], bool] | None = None,
) -> list[Run]:
    """Run several fresh sandboxed interpreters at once, each with ``limits`` and its own directory, under one
    deadline; the run ends when the first job's interpreter has ended, and then every other one is killed too.

    Args:
        jobs: The interpreters; the first leads (its end, or ``watch``, ends them all).
        limits: Resources of each interpreter (the output cap too is each one's).
        seconds: Wall-clock deadline of them all together.
        isolation: ``"bwrap"`` or ``"process"``, the same for every job.
        watch: Called with the first job's stdout so far after each chunk read; returning False ends the run.

    Returns:
        One :class:`Run` per job; a job still running when the run ended has ``returncode`` None and ``stopped``.
    """
    if isolation not in ("bwrap", "process"):
        raise ValueError(f"isolation must be 'bwrap' or 'process' here, got {isolation!r}")
    drop = isolation == "bwrap" and os.getuid() == 0
    # Each job's allowance counts the tasks its uid already runs, and its partners' interpreters.
    processes = limits.processes + (_shared_tasks(isolation, drop) + len(jobs) - 1 if _counted(isolation, drop) else 0)
    workdirs: list[str] = []
    started: list[subprocess.Popen] = []
    try:
        try:
            for job in jobs:
                workdirs.append(_workdir(job, drop))
                started.append(_start(job, workdirs[-1], limits, seconds, isolation, drop, processes))
        except BaseException:  # a later job did not start: end the earlier ones
            for process in started:
                _kill(process)
            raise
        finally:  # the descriptors now belong to the jobs: a job's end then shows as end of file on the other side
            for job in jobs:
                for fd in job.pass_fds:
                    os.close(fd)
        return _collect(started, time.monotonic() + seconds, limits.output_bytes, watch)
    finally:
        for workdir in workdirs:
            _remove(workdir)


def _workdir(job: Job, drop: bool) -> str:
    workdir = os.path.realpath(tempfile.mkdtemp(prefix=_WORKDIR_PREFIX))
    for name, text in {**job.files, "stdin.txt": job.stdin or ""}.items():
        Path(workdir, name).write_text(text, encoding="utf-8")
    if drop:  # the program runs as nobody and needs its directory
        for path in (workdir, *(os.path.join(workdir, name) for name in os.listdir(workdir))):
            os.chown(path, NOBODY, NOBODY)
    return workdir


def _start(
    job: Job, workdir: str, limits: Limits, seconds: float, isolation: str, drop: bool, processes: int
) -> subprocess.Popen:
    config = {
        "memory_bytes": limits.memory_bytes,
        "cpu_seconds": math.ceil(seconds),
        "processes": processes,
        "file_bytes": limits.file_bytes,
        "uid": NOBODY if drop else None,
        "path": site_path(),
    }
    command = [sys.executable, "-I", "-B", "-S", "-c", _LAUNCHER, marshal.dumps(config).hex()]
    command.append(os.path.join(workdir, job.script))
    if isolation == "bwrap":
        command = _bwrap_prefix(workdir, drop) + command
    with open(os.path.join(workdir, "stdin.txt"), "rb") as stdin_file:
        return subprocess.Popen(
            command,
            stdin=stdin_file,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=_environment(workdir),
            start_new_session=True,
            pass_fds=job.pass_fds,
        )


@functools.lru_cache(maxsize=1)
def site_path() -> list[str]:
    """The site directories a sandboxed interpreter adds to its path, worked out once here: the trainer's
    site-packages and the directories their ``.pth`` files name. Their ``import`` lines (editable-install finders,
    setuptools' distutils shim, certificate hooks) are not run: they cost tens of milliseconds per interpreter and
    run third-party code before the program's first line."""
    paths: list[str] = []
    for directory in site.getsitepackages():
        if not os.path.isdir(directory):
            continue
        paths.append(directory)
        for name in sorted(os.listdir(directory)):
            if not name.endswith(".pth") or name.startswith("."):
                continue
            try:
                lines = Path(directory, name).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError):
                continue
            for line in lines:
                line = line.rstrip()
                if not line or line.startswith(("#", "import ", "import\t")):
                    continue
                full = os.path.realpath(os.path.join(directory, line))
                if os.path.isdir(full) and full not in paths:
                    paths.append(full)
    return paths


def _counted(isolation: str, drop: bool) -> bool:
    """Whether the kernel counts other tasks against a job's process limit (see :func:`_shared_tasks`)."""
    return not (isolation == "bwrap" and not drop or isolation == "process" and os.getuid() == 0)


def _shared_tasks(isolation: str, drop: bool) -> int:
    """Tasks that already count against the program's process limit before it starts one.

    The kernel counts every task (process or thread) of the real user within its user namespace. An unprivileged
    bwrap gives the program a namespace of its own (nothing to add); root's plain process is never limited; otherwise
    the program gets its allowance on top of what its uid already runs (the trainer's user, or nobody: all of a root
    trainer's sandboxes at once).
    """
    if not _counted(isolation, drop):
        return 0
    uid, count = NOBODY if drop else os.getuid(), 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:  # the process ended while we looked
                pass
    return count


def _environment(workdir: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        # One thread each: the process limit counts threads, and BLAS pools would take the whole allowance.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def _collect(
    processes: list[subprocess.Popen], deadline: float, cap: int, watch: Callable[[bytes], bool] | None
) -> list[Run]:
    """Read every process's pipes until the first process has ended (or the deadline, the output cap or ``watch``
    ends the run), then kill them all."""
    lead = processes[0]
    stdout = {p.pid: bytearray() for p in processes}
    stderr = {p.pid: bytearray() for p in processes}
    total = dict.fromkeys(stdout, 0)
    exceeded: set[int] = set()
    timed_out = stopped = False
    try:
        with selectors.DefaultSelector() as selector:
            for process in processes:
                selector.register(process.stdout, selectors.EVENT_READ, (process.pid, True))
                selector.register(process.stderr, selectors.EVENT_READ, (process.pid, False))
            lead_pipes = {lead.stdout, lead.stderr}
            while lead_pipes and not (timed_out or exceeded or stopped):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                events = selector.select(min(remaining, 0.1))
                if not events and lead.poll() is not None:
                    break  # it exited, and what it wrote is read: a child it left holds the pipes open
                for key, _ in events:
                    pid, is_stdout = key.data
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        selector.unregister(key.fileobj)
                        lead_pipes.discard(key.fileobj)
                        continue
                    total[pid] += len(chunk)
                    if total[pid] > cap:
                        exceeded.add(pid)
                        break
                    if is_stdout:
                        stdout[pid] += chunk
                        if pid == lead.pid and watch is not None and not watch(bytes(stdout[pid])):
                            stopped = True
                            break
                    else:
                        stderr[pid] += chunk[: max(0, _STDERR_KEPT - len(stderr[pid]))]
        if not (timed_out or exceeded or stopped):  # its pipes closed: wait for its exit, still within the deadline
            try:
                lead.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
        ended = [process.poll() is not None for process in processes]
    finally:  # also on an error or Ctrl-C: nothing outlives the run
        for process in processes:
            _kill(process)
    runs = []
    for index, process in enumerate(processes):
        killed = timed_out or process.pid in exceeded or stopped or (index > 0 and not ended[index])
        runs.append(
            Run(
                None if killed else process.returncode,
                bytes(stdout[process.pid]),
                bytes(stderr[process.pid]),
                timed_out=timed_out,
                output_exceeded=process.pid in exceeded,
                stopped=stopped or (index > 0 and not ended[index]),
            )
        )
    return runs


def _kill(process: subprocess.Popen) -> None:
    # Children the program left behind share its process group (under bwrap, killing bwrap ends them all).
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()
    process.stdout.close()
    process.stderr.close()


def _remove(workdir: str) -> None:
    def unlock(function, path, _error):  # a program may have taken write permission off its own directories
        os.chmod(os.path.dirname(path), 0o700)
        function(path)

    shutil.rmtree(workdir, onerror=unlock)


def _bwrap_prefix(workdir: str, drop: bool) -> list[str]:
    """The bubblewrap command line in front of the interpreter (see the module docstring for what it isolates)."""
    args = [
        shutil.which("bwrap") or "bwrap",
        "--die-with-parent",
        "--new-session",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-ipc",
    ]
    args += ["--unshare-uts", "--unshare-cgroup-try"]
    if not drop:  # an unprivileged bwrap works inside a user namespace; root keeps the real uids so it can drop
        args.append("--unshare-user")
    args += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    needed = {os.path.realpath(p) for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix)}
    needed.add(os.path.dirname(os.path.realpath(sys.executable)))
    hidden = {tempfile.gettempdir(), "/tmp", "/var/tmp", os.path.expanduser("~")}
    if drop:  # nobody must reach the interpreter: hide (then re-expose) whatever it could not traverse
        hidden |= {blocked for path in needed if (blocked := _first_closed_ancestor(path)) is not None}
    hidden = _outermost(os.path.realpath(p) for p in hidden if os.path.isdir(p) and os.path.realpath(p) != "/")
    for path in hidden:
        args += ["--tmpfs", path]
    for path in sorted({*_outermost(needed), workdir}):
        inside = next((h for h in hidden if path.startswith(h + os.sep)), None)
        if inside is not None:
            # Directories that bwrap would create 0700 on the way down: nobody must be able to pass them.
            parts = Path(path).relative_to(inside).parts[:-1]
            for depth in range(1, len(parts) + 1):
                args += ["--perms", "0755", "--dir", os.path.join(inside, *parts[:depth])]
        if path == workdir:  # the one writable place, wherever it lies
            args += ["--bind", path, path]
        elif inside is not None:
            args += ["--ro-bind", path, path]
    for path in hidden:
        args += ["--remount-ro", path]
    return args + ["--chdir", workdir, "--"]


def _first_closed_ancestor(path: str) -> str | None:
    current = "/"
    for part in Path(path).parts[1:]:
        current = os.path.join(current, part)
        if not os.stat(current).st_mode & 0o001:
            return current
    return None


def _outermost(paths) -> list[str]:
    kept: list[str] = []
    for path in sorted(set(paths)):
        if not any(path == k or path.startswith(k + os.sep) for k in kept):
            kept.append(path)
    return kept


@functools.lru_cache(maxsize=1)
def bwrap_works() -> bool:
    """Whether a trial program runs through bubblewrap here (installed, and namespaces allowed); cached."""
    if shutil.which("bwrap") is None:
        return False
    run = run_python({"main.py": "print('ok')"}, "main.py", Limits(), 30.0, "bwrap")
    return run.returncode == 0 and run.stdout == b"ok\n"


def resolve_isolation(isolation: str) -> str:
    """``"bwrap"`` or ``"process"`` for a requested isolation.

    Raises:
        ValueError: For an unknown isolation, or ``"bwrap"`` where bubblewrap cannot run.
    """
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
    if isolation == "process":
        return "process"
    if bwrap_works():
        return "bwrap"
    if isolation == "bwrap":
        raise ValueError(
            "isolation='bwrap' but bubblewrap cannot run here: install it (Debian/Ubuntu: apt-get install bubblewrap) "
            "and allow user namespaces, or choose isolation='process' (see trd_lightning.verify.sandbox)."
        )
    warnings.warn(
        "bubblewrap (bwrap) cannot run here: generated programs run as plain limited processes, with network access "
        "and the trainer's file permissions. Install bubblewrap for namespaces (see trd_lightning.verify.sandbox).",
        stacklevel=2,
    )
    return "process"
