"""The first code a checked program's fresh interpreter runs: set the limits, give up root, run the script.

The sandbox passes this file's text as ``python -I -B -S -c <text> <config> <script>`` (the config as the hex of a
:mod:`marshal` dump), so nothing of the trainer's process is forked or inherited: the limits are set from inside the
new interpreter, before the program's first line. Only the standard library may be used here.
"""

import marshal
import os
import resource
import sys


def _main() -> None:
    config = marshal.loads(bytes.fromhex(sys.argv[1]))  # marshal, not json: no import to pay for at each start
    processes, cpu = config["processes"], config["cpu_seconds"]
    limits = {
        resource.RLIMIT_AS: (config["memory_bytes"],) * 2,
        resource.RLIMIT_CPU: (cpu, cpu + 1),  # SIGXCPU at the soft limit, SIGKILL one second later
        resource.RLIMIT_NPROC: (processes,) * 2,
        resource.RLIMIT_FSIZE: (config["file_bytes"],) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    for kind, value in limits.items():
        resource.setrlimit(kind, value)
    if config["uid"] is not None:  # root inside the sandbox: become an unprivileged user, which also drops every cap
        os.setgroups([])
        os.setgid(config["uid"])
        os.setuid(config["uid"])
    # Started with -S: the trainer's site directories, without running their .pth files' import lines (the trainer
    # worked the path out once); the builtins that site adds (exit, quit, help) are still there.
    sys.path.extend(config["path"])
    import site

    site.setquit()
    site.setcopyright()
    site.sethelper()
    # The script as __main__, in a fresh module, as runpy.run_path would run it (runpy itself imports pkgutil and
    # typing: tens of milliseconds at every start).
    script = sys.argv[2]
    sys.argv = [script]
    module = sys.modules["__main__"] = type(sys)("__main__")
    module.__file__ = script
    with open(script, "rb") as file:
        code = compile(file.read(), script, "exec")
    exec(code, module.__dict__)


if __name__ == "__main__":  # as ``-c`` text; importing this file runs nothing
    _main()
