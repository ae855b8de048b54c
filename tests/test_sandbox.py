"""Tests for trd_lightning.verify.sandbox: what a run sees, its limits, and an adversarial table per isolation.

Every adversarial program prints ATTACK-OK only when its attack worked, and ATTACK-OK is the expected output, so its
verdict fails exactly when the sandbox held. Rows the plain process does not guarantee are skipped there, with the
reason (the README section lists them); under bubblewrap every row must hold.
"""

from __future__ import annotations

import os
import secrets
import socket
import sys
import tempfile
import time
from pathlib import Path

import pytest

from trd_lightning.verify import sandbox
from trd_lightning.verify.code import CodeVerifier
from trd_lightning.verify.reference import stdio_tests
from trd_lightning.verify.sandbox import Limits, run_python

ROOT = os.getuid() == 0
ISOLATIONS = [
    pytest.param("bwrap", marks=pytest.mark.skipif(not sandbox.bwrap_works(), reason="bubblewrap cannot run here")),
    "process",
]
LIMITS = Limits(
    seconds=1.0, startup_seconds=1.0, memory_bytes=512 << 20, processes=8, file_bytes=1 << 20, output_bytes=1 << 20
)


def _run(source: str, isolation: str, stdin: str | None = None, limits: Limits = LIMITS, **kw):
    return run_python({"main.py": source}, "main.py", limits, 10.0, isolation, stdin=stdin, **kw)


def _left_behind() -> list[str]:
    """Processes still running a sandboxed interpreter (their command line names a run's directory)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if b"trd-code-" in cmdline:
                found.append(entry)
    return found


def _workdirs() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("trd-code-")}


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_environment_directory_and_interpreter(isolation):
    before = _workdirs()
    source = (
        "import os, sys, json\n"
        "print(json.dumps({'env': sorted(os.environ), 'cwd': os.getcwd(), 'home': os.environ['HOME'],\n"
        "  'tmp': os.environ['TMPDIR'], 'isolated': sys.flags.isolated, 'path0': sys.path[0],\n"
        "  'stdin': sys.stdin.read(), 'uid': os.getuid()}))\n"
    )
    run = _run(source, isolation, stdin="given\n")
    assert run.returncode == 0, run.stderr
    seen = __import__("json").loads(run.stdout)
    expected = {"HOME", "LANG", "MKL_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PATH", "TMPDIR"}
    assert set(seen["env"]) - {"PWD"} == expected  # bubblewrap sets PWD to the working directory
    assert seen["cwd"] == seen["home"] == seen["tmp"]
    assert Path(seen["cwd"]).name.startswith("trd-code-")
    assert not Path(seen["cwd"]).exists()  # removed after the run
    assert _workdirs() == before
    assert seen["isolated"] == 1 and seen["path0"] != "" and not seen["path0"].startswith(seen["cwd"])
    assert seen["stdin"] == "given\n"
    assert seen["uid"] == (sandbox.NOBODY if isolation == "bwrap" and ROOT else os.getuid())


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_limits_are_set(isolation):
    source = (
        "import resource as r\n"
        "print(r.getrlimit(r.RLIMIT_AS)[0], r.getrlimit(r.RLIMIT_CPU)[0], r.getrlimit(r.RLIMIT_FSIZE)[0],"
        " r.getrlimit(r.RLIMIT_CORE)[0], r.getrlimit(r.RLIMIT_NPROC)[0])\n"
    )
    run = run_python({"main.py": source}, "main.py", LIMITS, 2.5, isolation)
    memory, cpu, size, core, processes = map(int, run.stdout.split())
    assert (memory, cpu, size, core) == (512 << 20, 3, 1 << 20, 0)  # CPU: the 2.5 s deadline rounded up
    assert processes >= 8  # 8 on top of the user's other tasks where the kernel counts those too


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_watch_stops_early_and_output_is_capped(isolation):
    start = time.monotonic()
    run = _run("import time\nprint('a', flush=True)\ntime.sleep(30)\n", isolation, watch=lambda out: b"a" not in out)
    assert run.stopped and run.returncode is None and time.monotonic() - start < 8
    run = _run("import sys\nwhile True: sys.stdout.write('x' * 65536)\n", isolation)
    assert run.output_exceeded and len(run.stdout) <= LIMITS.output_bytes


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_a_program_may_start_threads(isolation):
    # Competitive programmers run main() in a thread with a big stack for deep recursion: the process limit, which
    # counts threads, must leave room for that (here with 4 other runs at once).
    source = (
        "import sys, threading\nsys.setrecursionlimit(100000)\nthreading.stack_size(1 << 26)\n"
        "def depth(n):\n    return 0 if n == 0 else 1 + depth(n - 1)\n"
        "def main():\n    print(depth(int(input())))\nt = threading.Thread(target=main)\nt.start()\nt.join()\n"
    )
    verifier = CodeVerifier(max_workers=4, limits=LIMITS, isolation=isolation)
    assert verifier([source] * 4, [stdio_tests([("20000\n", "20000\n")])] * 4) == [True] * 4


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_interpreters_run_together_over_a_passed_socket(isolation):
    # The lead asks, the follower answers through a socket pair; the lead's end ends the run and kills the follower,
    # which would otherwise sleep for 30 s. Each sees only its own directory.
    lead_end, follower_end = (end.detach() for end in socket.socketpair())
    lead = (
        "import os, socket\ns = socket.socket(fileno=FD)\ns.sendall(b'ping')\nprint(s.recv(4).decode(),"
        " sorted(os.listdir('.')))\n"
    ).replace("FD", str(lead_end))
    follower = (
        "import socket, time\ns = socket.socket(fileno=FD)\ns.sendall(s.recv(4).replace(b'i', b'o'))\ntime.sleep(30)\n"
    ).replace("FD", str(follower_end))
    jobs = [
        sandbox.Job({"main.py": lead, "a.txt": "a"}, "main.py", pass_fds=(lead_end,)),
        sandbox.Job({"main.py": follower, "b.txt": "b"}, "main.py", pass_fds=(follower_end,)),
    ]
    start = time.monotonic()
    first, second = sandbox.run_together(jobs, LIMITS, 10.0, isolation)
    assert time.monotonic() - start < 8
    assert first.returncode == 0 and first.stdout == b"pong ['a.txt', 'main.py', 'stdin.txt']\n", first
    assert second.returncode is None and second.stopped  # still sleeping when the lead ended: killed
    for fd in (lead_end, follower_end):  # handed over: closed here once the jobs started
        with pytest.raises(OSError):
            os.fstat(fd)
    assert _left_behind() == []


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_a_partner_that_dies_shows_as_the_end_of_its_socket(isolation):
    lead_end, follower_end = (end.detach() for end in socket.socketpair())
    lead = f"import socket\ns = socket.socket(fileno={lead_end})\nprint(repr(s.recv(10)))\n"
    follower = "import os\nos._exit(3)\n"
    jobs = [
        sandbox.Job({"main.py": lead}, "main.py", pass_fds=(lead_end,)),
        sandbox.Job({"main.py": follower}, "main.py", pass_fds=(follower_end,)),
    ]
    first, second = sandbox.run_together(jobs, LIMITS, 10.0, isolation)
    assert first.stdout == b"b''\n" and second.returncode == 3


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_the_interpreter_starts_without_site_hooks_but_with_site_packages(isolation):
    # -S: the site directories come from the trainer, the .pth files' import lines do not run; exit() still exists.
    source = (
        "import sys, numpy\nhooks = [m for m in sys.modules if m.startswith(('__editable__', '_distutils_hack'))]\n"
        "print(sys.flags.no_site, hooks, callable(exit))\nexit(0)\n"
    )
    run = _run(source, isolation)
    assert run.returncode == 0 and run.stdout == b"1 [] True\n", run
    assert sandbox.site_path()[0] in __import__("site").getsitepackages()


def test_limits_and_isolation_are_validated(monkeypatch):
    with pytest.raises(ValueError, match="Limits.seconds"):
        Limits(seconds=0)
    with pytest.raises(ValueError, match="isolation"):
        sandbox.resolve_isolation("docker")
    monkeypatch.setattr(sandbox, "bwrap_works", lambda: False)
    with pytest.raises(ValueError, match="apt-get install bubblewrap"):
        sandbox.resolve_isolation("bwrap")
    with pytest.warns(UserWarning, match="plain limited processes"):
        assert sandbox.resolve_isolation("auto") == "process"


# Adversarial table. name: (program, statuses its verdict may have, why the plain process does not guarantee it).
# Placeholders the test fills: WATCHED (world-writable directories the test watches), PLANTED (files it planted),
# PORT (a loopback port it listens on), SECRET (the name of a variable in the trainer's environment).
_ALL_FAIL = {"wrong_answer", "runtime_error", "timeout", "output_limit"}
ATTACKS = {
    "infinite loop": ("while True:\n    pass\n", {"timeout"}, None),
    "fork bomb": (
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
        {"timeout"},
        "the kernel does not enforce the process limit for root" if ROOT else None,
    ),
    "memory hog": ("a = []\nwhile True:\n    a.append(bytearray(1 << 24))\n", {"runtime_error"}, None),
    "huge file": ("open('big', 'wb').write(b'0' * (64 << 20))\nprint('ATTACK-OK')\n", {"runtime_error"}, None),
    "printing gigabytes": ("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", {"output_limit"}, None),
    "never reads stdin": ("print(0)\n", {"wrong_answer"}, None),
    "blocks reading stdin": (
        "import sys, time\ndata = sys.stdin.read()\nwhile 'END' not in data:\n    time.sleep(0.05)\n"
        "    data += sys.stdin.read()\n",
        {"timeout"},
        None,
    ),
    "reads the trainer's variables": (
        "import os\nprint(os.environ.get(SECRET, 'absent'))\n",
        {"wrong_answer"},
        None,
    ),
    "reads the trainer's /proc environ": (
        "import os\nfor p in os.listdir('/proc'):\n    try:\n"
        "        env = open(f'/proc/{p}/environ', 'rb').read().split(b'\\0')\n    except Exception:\n"
        "        continue\n    for item in env:\n        if item.startswith(SECRET.encode() + b'='):\n"
        "            print(item.split(b'=', 1)[1].decode())\n            raise SystemExit\nprint('absent')\n",
        {"wrong_answer"},
        "the program runs as the trainer's user and can read its processes' environment in /proc",
    ),
    "writes outside its directory": (
        "import os\nok = False\nfor d in WATCHED:\n    try:\n"
        "        open(os.path.join(d, 'trd-pwned'), 'w').write('x')\n        ok = True\n    except OSError:\n"
        "        pass\nif ok:\n    print('ATTACK-OK')\n",
        {"wrong_answer"},
        "the program may write wherever the trainer's user may",
    ),
    "deletes files": (
        "import os\nok = False\nfor f in PLANTED:\n    try:\n        os.remove(f)\n        ok = True\n"
        "    except OSError:\n        pass\nif ok:\n    print('ATTACK-OK')\n",
        {"wrong_answer"},
        "the program may delete whatever the trainer's user may",
    ),
    "opens a network connection": (
        "import socket\ns = socket.create_connection(('127.0.0.1', PORT), timeout=2)\ns.sendall(b'hi')\n"
        "print('ATTACK-OK')\n",
        {"runtime_error"},
        "the plain process shares the trainer's network",
    ),
    "signals its parent": (
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nprint('ATTACK-OK')\n",
        {"runtime_error"},
        "the program may signal any process of the trainer's user (it would kill the test)",
    ),
    "leaves a child behind": ("import os, time\nif os.fork() == 0:\n    time.sleep(30)\n", {"wrong_answer"}, None),
    "leaves a daemon behind": (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\nelse:\n    while True:\n"
        "        pass\n",
        {"timeout"},
        "a program that starts a new session leaves the process group that is killed",
    ),
}


@pytest.fixture
def targets(tmp_path):
    """Directories and files outside the sandbox, made writable by anyone so that only isolation can protect them."""
    dirs = [tmp_path / "watched", Path(tempfile.mkdtemp(dir="/var/tmp")) if os.access("/var/tmp", os.W_OK) else None]
    dirs = [d for d in dirs if d is not None]
    dirs[0].mkdir()
    planted = []
    for d in dirs:
        d.chmod(0o777)
        for name in ("keep-a", "keep-b"):
            (d / name).write_text("planted")
            (d / name).chmod(0o666)
            planted.append(d / name)
    # Places outside any temp directory: the trainer's home and a world-writable system directory.
    extra = [Path.home()] + [Path("/run/lock")] * os.access("/run/lock", os.W_OK)
    yield {"watched": dirs + extra, "planted": planted}
    for d in dirs + extra:
        (d / "trd-pwned").unlink(missing_ok=True)
    if len(dirs) > 1:
        for f in dirs[1].iterdir():
            f.unlink()
        dirs[1].rmdir()


@pytest.fixture
def listener():
    """A loopback port the trainer listens on."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.5)
        yield server


def _secret_in_my_initial_environment() -> tuple[str, str] | None:
    # /proc/self/environ holds the environment this process started with, which a same-user program could read.
    sandbox_names = {"PATH", "HOME", "TMPDIR", "LANG", "PWD", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"}
    for item in Path("/proc/self/environ").read_bytes().split(b"\0"):
        name, _, value = item.decode(errors="replace").partition("=")
        if name and value.strip() and name not in sandbox_names and "MKL" not in name and " " not in value:
            return name, value
    return None


@pytest.mark.parametrize("isolation", ISOLATIONS)
@pytest.mark.parametrize("name", list(ATTACKS))
def test_adversarial_program_fails_within_its_limit(name, isolation, targets, listener, monkeypatch):
    source, statuses, not_guaranteed = ATTACKS[name]
    if isolation == "process" and not_guaranteed:
        pytest.skip(f"not guaranteed without bubblewrap: {not_guaranteed}")
    secret = f"TRD_TEST_SECRET_{secrets.token_hex(4)}"
    expected = "ATTACK-OK"
    if name == "reads the trainer's variables":
        monkeypatch.setenv(secret, expected)
    if name == "reads the trainer's /proc environ":
        found = _secret_in_my_initial_environment()
        if found is None:
            pytest.skip("this process started with no variable to look for")
        secret, expected = found
    replacements = {
        "WATCHED": repr([str(d) for d in targets["watched"]]),
        "PLANTED": repr([str(f) for f in targets["planted"]]),
        "PORT": str(listener.getsockname()[1]),
        "SECRET": repr(secret),
    }
    for key, value in replacements.items():
        source = source.replace(key, value)
    stdin = "1 2 3\n" * 400_000 if name == "never reads stdin" else ""  # 2.4 MB, far more than a pipe holds
    before = _workdirs()
    verifier = CodeVerifier(max_workers=1, limits=LIMITS, isolation=isolation)
    start = time.monotonic()
    [verdict] = verifier.check([f"```python\n{source}```"], [stdio_tests([(stdin, expected)])])
    elapsed = time.monotonic() - start
    assert not verdict.passed and verdict.status in statuses, verdict
    assert elapsed < LIMITS.seconds + LIMITS.startup_seconds + 5.0
    with pytest.raises(TimeoutError):  # no connection reached the trainer's loopback
        listener.accept()
    for d in targets["watched"]:
        assert not (d / "trd-pwned").exists(), d
    for f in targets["planted"]:
        assert f.read_text() == "planted"
    assert _workdirs() == before
    deadline = time.monotonic() + 2.0
    while _left_behind() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _left_behind() == []
    assert sys.executable  # still here: the test process survived
