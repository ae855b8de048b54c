"""The first code a checked program's fresh interpreter runs: set the limits, give up root, run the script.

The sandbox passes this file's text as ``python -I -B -c <text> <config JSON>``, so nothing of the trainer's process
is forked or inherited: the limits are set from inside the new interpreter, before the program's first line. Only the
standard library may be used here.
"""

import json
import os
import resource
import runpy
import sys


def _tasks_of(uid: int) -> int:
    # The kernel counts RLIMIT_NPROC over every task (process or thread) of the real user in its user namespace, not
    # over this program alone: outside a namespace of its own the program gets its allowance on top of what is there.
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid:
                    count += len(os.listdir(f"/proc/{entry.name}/task"))
            except OSError:  # the process ended while we looked
                pass
    return count


def _main() -> None:
    config = json.loads(sys.argv[1])
    processes = config["processes"]
    if config["count_uid"] is not None:
        processes += _tasks_of(config["count_uid"])
    cpu = config["cpu_seconds"]
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
    sys.argv = [config["script"]]
    runpy.run_path(config["script"], run_name="__main__")


_main()
