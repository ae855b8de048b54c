"""Throughput of the code checker: programs checked per second on a realistic mix, per isolation, side by side.

    OMP_NUM_THREADS=1 python benchmarks/code_checker.py --workers 2 --programs 96

The mix stands for one step's rollouts on a TACO-like set: per 16 programs, 8 right stdin/stdout programs (3 cases
each, so 3 processes), 3 wrong ones (stopped at the first case), 2 right call-based and 1 right assert-style programs
(one process each), 1 that raises, and 1 endless loop (killed at ``--seconds`` plus the startup allowance). Every
verdict is checked against the status the program is built to get, so a figure never comes from a broken run.

Both isolations check the same programs in one run with the same ``--workers`` (threads, each driving one sandboxed
interpreter at a time). Printed: wall seconds, programs per second and interpreter processes per second, after the
machine's load average (other jobs share its cores, and the figures move with their load: a bare ``python -I -c pass``
takes about 40 ms on an idle core of the development machine and three times that under a load of 5). The children's
CPU time is not printed: under bubblewrap the interpreters are reaped inside its namespace, out of this process's
accounting.
"""

from __future__ import annotations

import argparse
import os
import time

from trd_lightning.verify import CodeVerifier, Limits
from trd_lightning.verify.reference import assert_tests, call_tests, stdio_tests
from trd_lightning.verify.sandbox import bwrap_works

SUM = stdio_tests([("1 2\n", "3\n"), ("10 -4\n", "6\n"), ("0 0\n", "0\n")])
ADD = call_tests("add", [([1, 2], 3), ([10, -4], 6), ([0, 0], 0)])
ASSERTS = assert_tests("assert add(1, 2) == 3\nassert add(10, -4) == 6\nassert add(0, 0) == 0\n", "add")
# (program, tests, expected status, interpreter processes it starts)
KINDS = [
    ("a, b = map(int, input().split())\nprint(a + b)\n", SUM, "passed", 3),
    ("a, b = map(int, input().split())\nprint(a * b)\n", SUM, "wrong_answer", 1),
    ("def add(a, b):\n    return a + b\n", ADD, "passed", 1),
    ("def add(a, b):\n    return a + b\n", ASSERTS, "passed", 1),
    ("raise RuntimeError('bug')\n", SUM, "runtime_error", 1),
    ("while True:\n    pass\n", SUM, "timeout", 1),
]
PER_16 = [0] * 8 + [1] * 3 + [2] * 2 + [3] + [4] + [5]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--programs", type=int, default=96, help="programs per isolation (a multiple of 16)")
    parser.add_argument("--workers", type=int, default=2, help="programs checked at once")
    parser.add_argument("--seconds", type=float, default=1.0, help="wall-clock limit per test case")
    args = parser.parse_args()
    if args.programs < 16 or args.programs % 16:
        parser.error("--programs must be a positive multiple of 16")
    picks = PER_16 * (args.programs // 16)
    responses = [f"```python\n{KINDS[k][0]}```" for k in picks]
    references = [KINDS[k][1] for k in picks]
    processes = sum(KINDS[k][3] for k in picks)
    limits = Limits(seconds=args.seconds, startup_seconds=1.0)
    isolations = ["bwrap", "process"] if bwrap_works() else ["process"]
    print(
        f"{args.programs} programs ({processes} interpreter processes), {args.workers} workers, {args.seconds} s/case"
    )
    print("load average (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"{'isolation':<10} {'wall s':>8} {'programs/s':>11} {'processes/s':>12}")
    for isolation in isolations:
        verifier = CodeVerifier(max_workers=args.workers, limits=limits, isolation=isolation)
        start = time.perf_counter()
        verdicts = verifier.check(responses, references)
        wall = time.perf_counter() - start
        wrong = [(i, v) for i, (k, v) in enumerate(zip(picks, verdicts)) if v.status != KINDS[k][2]]
        if wrong:
            raise SystemExit(f"{isolation}: unexpected verdicts, first {wrong[0]}")
        print(f"{isolation:<10} {wall:>8.2f} {args.programs / wall:>11.1f} {processes / wall:>12.1f}")


if __name__ == "__main__":
    main()
