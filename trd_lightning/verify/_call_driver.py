"""Call-based harness, the sandbox's main script: load ``solution.py``, call its function on each input, report.

One JSON line per case goes to a private copy of stdout, ``{"value": ...}`` or ``{"error": ...}``; the program's own
prints go to stderr. The expected outputs never enter the sandbox: the trainer compares each line as it arrives and
stops the run at the first wrong one. Only the standard library may be used here.
"""

import json
import os
import signal
import sys
import types


class _CaseTimeout(BaseException):  # not an Exception: a program's ``except Exception`` must not swallow it
    pass


def _alarm(signum, frame):
    raise _CaseTimeout


def _plain(value):
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays
    return tolist() if callable(tolist) else repr(value)


def _main():
    with open("harness.json") as file:
        spec = json.load(file)
    os.remove("harness.json")
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    # A real module, not __main__: a program's own ``if __name__ == "__main__"`` block stays out, and dataclasses or
    # pickle find the module they were defined in.
    module = sys.modules["solution"] = types.ModuleType("solution")
    namespace = module.__dict__
    with open("solution.py") as file:
        exec(compile(file.read(), "solution.py", "exec"), namespace)
    name, solution = spec["fn_name"], namespace.get("Solution")
    if isinstance(solution, type) and hasattr(solution, name):

        def target():
            return getattr(solution(), name)  # a fresh instance per case, as LeetCode does

    elif callable(namespace.get(name)):

        def target():
            return namespace[name]

    else:
        raise NameError(f"the program defines no function {name!r} and no class Solution with that method")
    signal.signal(signal.SIGALRM, _alarm)
    for arguments in spec["inputs"]:
        signal.setitimer(signal.ITIMER_REAL, spec["seconds"])
        try:
            line = {"value": target()(*arguments)}
        except _CaseTimeout:
            line = {"error": "timeout"}
        except Exception as error:
            line = {"error": f"{type(error).__name__}: {error}"[:300]}
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        try:
            text = json.dumps(line, default=_plain)
        except (TypeError, ValueError, RecursionError) as error:
            text = json.dumps({"error": f"result not serialisable: {error}"[:300]})
        channel.write(text + "\n")
        channel.flush()
        if "error" in line:
            return


if __name__ == "__main__":  # run by the sandbox as its main script; importing runs nothing
    _main()
