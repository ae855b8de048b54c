"""Tests for the code checker: extraction, lenient comparison, the three harnesses, pass@k, and the verifier API.

Expectations are worked out by hand from the programs and tests written here, never read off the checker.
"""

from __future__ import annotations

import time

import pytest
import torch

from trd_lightning.metrics import AvgAtK, PassAtK, pass_at_k
from trd_lightning.verify import CodeVerifier, Limits, MathVerifier, extract_program, make_verifier
from trd_lightning.verify.compare import stdout_matches, values_match
from trd_lightning.verify.reference import assert_tests, call_tests, parse_tests, stdio_tests

LIMITS = Limits(seconds=1.5, startup_seconds=2.0)


@pytest.fixture(scope="module")
def verifier():
    return CodeVerifier(max_workers=2, limits=LIMITS)


def _block(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}```\nIt reads the input and prints the answer."


@pytest.mark.parametrize(
    ("response", "program"),
    [
        ("```python\na = 1\n```\ntext\n```python\nb = 2\n```\n", "b = 2\n"),
        ("```py\nx = 1\n```", "x = 1\n"),
        ("```Python3\nx = 3\n```", "x = 3\n"),
        ("first\n```\nbare = 1\n```\nthen a shell line\n```bash\nls\n```\n", "bare = 1\n"),
        ("```cpp\nint main() {}\n```", "```cpp\nint main() {}\n```"),  # no python block: the whole response
        ("```python\ndone = 1\n```\n```python\ncut = 'at the token limit'\n", "cut = 'at the token limit'\n"),
        ("print(42)", "print(42)"),
        ("```pyth\nnot = 'python'\n```", "```pyth\nnot = 'python'\n```"),
    ],
)
def test_extract_program(response, program):
    assert extract_program(response) == program


@pytest.mark.parametrize(
    ("got", "expected", "equal"),
    [
        ("3 4\n5\n", "3 4\n5", True),
        ("3 4   \n5\t\n\n\n", "3 4\n5\n", True),  # trailing spaces, tabs, blank lines
        ("\n3 4\n\n5\n", "3 4\n5\n", True),
        ("3  4\n5\n", "3 4\n5\n", True),
        ("4 3\n5\n", "3 4\n5\n", False),  # order matters
        ("3 4 5\n", "3 4\n5\n", False),  # line structure matters
        ("0.3333333\n", "0.333333", True),  # |diff| = 3.3e-7 <= 1e-6
        ("0.334\n", "0.333333", False),
        ("1000000.5\n", "1000000.0", True),  # relative: 0.5 <= 1e-6 * 1e6
        ("1000002.0\n", "1000000.0", False),
        ("1.0\n", "1", True),
        ("007\n", "7", True),
        ("50000000000000001\n", "50000000000000000", False),  # integers exactly, never through floats
        ("YES\n", "yes", False),
        ("nan\n", "nan", True),  # equal as text
        ("", "", True),
        ("extra debug line\n3\n", "3\n", False),
    ],
)
def test_stdout_matches(got, expected, equal):
    assert stdout_matches(got, expected) is equal


@pytest.mark.parametrize(
    ("got", "expected", "equal"),
    [
        ([1, [2, 3]], [1, [2, 3]], True),
        ((1, 2), [1, 2], True),
        ([0.1 + 0.2], [0.3], True),
        ([0.31], [0.3], False),
        ({"a": 1.0000001}, {"a": 1}, True),
        ({"a": 1}, {"b": 1}, False),
        (2, 2.0, True),
        (10**30, 10**30 + 1, False),
        (True, True, True),
        ("1", 1, False),
        ([1, 2], [1, 2, 3], False),
    ],
)
def test_values_match(got, expected, equal):
    assert values_match(got, expected) is equal


SQUARE = stdio_tests([("3\n", "9\n"), ("-4\n", "16\n"), ("0\n", "0\n")])
AVERAGE = stdio_tests([("1 2\n", "1.5\n"), ("1 3\n", "2\n")])


def test_stdio_harness(verifier):
    cases = [
        (_block("n = int(input())\nprint(n * n)\n"), SQUARE, "passed"),
        (_block("n = int(input())\nprint(n + n)\n"), SQUARE, "wrong_answer"),  # 6 != 9 on the first case
        (_block("n = int(input())\nprint(n * n, ' ')\nprint()\nprint()\n"), SQUARE, "passed"),  # trailing whitespace
        (_block("n = int(input())\nprint('debug:', n)\nprint(n * n)\n"), SQUARE, "wrong_answer"),  # extra output
        (_block("n = int(input())\nprint(abs(n) * 3)\n"), SQUARE, "wrong_answer"),  # right on case 0 only
        (_block("raise ValueError('boom')\n"), SQUARE, "runtime_error"),
        (_block("import sys\nprint(9)\nsys.exit(3)\n"), SQUARE, "runtime_error"),  # right output, bad exit status
        (_block("a, b = map(int, input().split())\nprint((a + b) / 2)\n"), AVERAGE, "passed"),  # 1.5 and 2.0
        (_block("a, b = map(int, input().split())\nprint(f'{(a + b) / 2:.7f}')\n"), AVERAGE, "passed"),
        (_block("a, b = map(int, input().split())\nprint((a + b) // 2)\n"), AVERAGE, "wrong_answer"),  # 1 != 1.5
        (_block("print('π ≈', 3.14159)\n"), stdio_tests([("", "π ≈ 3.14159\n")]), "passed"),  # UTF-8 both ways
        (
            _block(
                "import sys\ndef main():\n    print(int(sys.stdin.read()) ** 2)\n\nif __name__ == '__main__':\n"
                "    main()\n"
            ),
            SQUARE,
            "passed",
        ),
    ]
    verdicts = verifier.check([c[0] for c in cases], [c[1] for c in cases])
    assert [v.status for v in verdicts] == [c[2] for c in cases], verdicts
    assert [v.passed for v in verdicts] == [c[2] == "passed" for c in cases]
    assert verdicts[4].detail.startswith("case 1")  # case 0 (3 -> 9) passed, case 1 (-4 -> 12) did not


def test_stdio_stops_at_the_first_failing_case(verifier):
    # Wrong on case 0, endless on the others: only case 0 runs.
    program = _block("n = int(input())\nif n == 3:\n    print(0)\nelse:\n    while True:\n        pass\n")
    start = time.monotonic()
    [verdict] = verifier.check([program], [SQUARE])
    assert verdict.status == "wrong_answer" and verdict.detail.startswith("case 0")
    assert time.monotonic() - start < LIMITS.seconds + LIMITS.startup_seconds


TWO_SUM = call_tests("twoSum", [([[2, 7, 11, 15], 9], [0, 1]), ([[3, 2, 4], 6], [1, 2]), ([[3, 3], 6], [0, 1])])
MEAN = call_tests("mean", [([[1, 2]], 1.5), ([[1, 1, 2]], 4 / 3)])


def test_call_harness(verifier):
    solution = (
        "from typing import List\nclass Solution:\n    def twoSum(self, nums: List[int], target: int) -> List[int]:\n"
        "        seen = {}\n        for i, x in enumerate(nums):\n            if target - x in seen:\n"
        "                return [seen[target - x], i]\n            seen[x] = i\n"
    )
    cases = [
        (_block(solution), TWO_SUM, "passed"),  # a method of class Solution
        (_block(solution.replace("return [seen[target - x], i]", "return (seen[target - x], i)")), TWO_SUM, "passed"),
        (_block(solution.replace("[seen[target - x], i]", "[i, seen[target - x]]")), TWO_SUM, "wrong_answer"),
        (_block("def twoSum(nums, target):\n    print('noise')\n    return [0, 1]\n"), TWO_SUM, "wrong_answer"),
        (_block("def mean(xs):\n    print('extra output', xs)\n    return sum(xs) / len(xs)\n"), MEAN, "passed"),
        (_block("def mean(xs):\n    return round(sum(xs) / len(xs), 2)\n"), MEAN, "wrong_answer"),  # 1.33 != 4/3
        (_block("def mean(xs):\n    return sum(xs) // len(xs)\n"), MEAN, "wrong_answer"),
        (_block("def mean(xs):\n    raise RuntimeError('no')\n"), MEAN, "runtime_error"),
        (_block("def average(xs):\n    return 0\n"), MEAN, "runtime_error"),  # no function named mean
        (_block("import os\ndef mean(xs):\n    os._exit(0)\n"), MEAN, "runtime_error"),
        (
            _block("def mean(xs):\n    if len(xs) == 3:\n        while True:\n            pass\n    return 1.5\n"),
            MEAN,
            "timeout",
        ),
    ]
    verdicts = verifier.check([c[0] for c in cases], [c[1] for c in cases])
    assert [v.status for v in verdicts] == [c[2] for c in cases], verdicts
    assert verdicts[5].detail.startswith("case 1")  # 1.5 matched, 1.33 did not
    assert verdicts[10].detail.startswith("case 1")


def test_call_harness_wrapped_outputs_and_early_stop(verifier):
    # TACO stores each output as a one-element list: [5] for a function returning 5.
    cases = [([2, 3], [5]), ([10, -1], [9])]
    wrapped, plain = call_tests("add", cases, wrapped=True), call_tests("add", cases)
    program = _block("def add(a, b):\n    return a + b\n")
    assert verifier([program, program], [wrapped, plain]) == [True, False]
    # Wrong on case 0, endless on case 1: the trainer stops the run at the first wrong result.
    slow = _block("def add(a, b):\n    if a == 10:\n        while True:\n            pass\n    return 0\n")
    start = time.monotonic()
    [verdict] = verifier.check([slow], [wrapped])
    assert verdict.status == "wrong_answer" and verdict.detail.startswith("case 0")
    assert time.monotonic() - start < LIMITS.seconds + LIMITS.startup_seconds


MBPP = assert_tests("assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(2.5, 0.25) == 2.75\n")
HUMANEVAL_TEST = (
    "import numpy as np\n\ndef check(candidate):\n    inputs = [[1.0, 2.0], [0.1, 0.2]]\n    results = [3.0, 0.3]\n"
    "    for inp, exp in zip(inputs, results):\n        assert np.allclose(candidate(*inp), exp, atol=1e-6)\n"
)
HUMANEVAL = assert_tests(HUMANEVAL_TEST + "\ncheck(add)\n", "add")


def test_assert_harness(verifier):
    good = "def add(a, b):\n    return a + b\n"
    cases = [
        (_block(good), MBPP, "passed"),
        (_block("def add(a, b):\n    return a - b\n"), MBPP, "wrong_answer"),
        (_block("def add(a, b):\n    print('extra output')\n    return a + b\n"), MBPP, "passed"),
        (_block(good + "if __name__ == '__main__':\n    print(add(int(input()), 1))\n"), MBPP, "passed"),
        (_block(good), HUMANEVAL, "passed"),  # 0.1 + 0.2 within the test's float tolerance
        (_block("def add(a, b):\n    return round(a + b)\n"), HUMANEVAL, "wrong_answer"),
        (_block("def plus(a, b):\n    return a + b\n"), HUMANEVAL, "runtime_error"),  # no entry point
        (_block("import os\nos._exit(0)\n"), MBPP, "runtime_error"),  # exit status 0 alone never passes
        (_block("import sys\nsys.exit(0)\n"), MBPP, "runtime_error"),
        (_block("def add(a, b):\n    while True:\n        pass\n"), MBPP, "timeout"),
    ]
    verdicts = verifier.check([c[0] for c in cases], [c[1] for c in cases])
    assert [v.status for v in verdicts] == [c[2] for c in cases], verdicts


def test_pass_at_k_on_code_against_hand_counts(verifier):
    # Problem A: 2 of 4 candidates pass. Problem B: 1 of 4.
    a = [
        "n = int(input())\nprint(n * n)\n",
        "n = int(input())\nprint(n ** 2)\n",
        "n = int(input())\nprint(n * 2)\n",
        "print(9)\n",
    ]
    b = [
        "def add(a, b):\n    return a + b\n",
        "def add(a, b):\n    return a * b\n",
        "def add(a, b):\n    return 3\n",
        "",
    ]
    responses = [_block(p) for p in a + b]
    correct = verifier(responses, [SQUARE] * 4 + [MBPP] * 4)
    assert correct == [True, True, False, False, True, False, False, False]
    hits = torch.tensor(correct).reshape(2, 4)
    pass2, pass1, avg = PassAtK(k=2), PassAtK(k=1), AvgAtK()
    for metric in (pass2, pass1, avg):
        metric.update(hits)
    # By hand: pass@2 = 1 - C(n-c, 2)/C(4, 2): A 1 - 1/6 = 5/6, B 1 - 3/6 = 1/2; pass@1 = c/n: 1/2 and 1/4.
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 / 2)
    assert pass2.compute().item() == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert pass1.compute().item() == pytest.approx((1 / 2 + 1 / 4) / 2)
    assert avg.compute().item() == pytest.approx(3 / 8)


def test_references_and_arguments_are_checked(verifier):
    with pytest.raises(ValueError, match="code_rows"):
        verifier(["print(1)"], ["42"])
    with pytest.raises(ValueError, match="harness"):
        verifier(["print(1)"], ['{"harness": "docker"}'])
    with pytest.raises(ValueError, match="rows without tests"):
        verifier(["print(1)"], [stdio_tests([])])
    with pytest.raises(ValueError, match="2 responses but 1 references"):
        verifier(["a", "b"], [SQUARE])
    with pytest.raises(ValueError, match="max_workers"):
        CodeVerifier(max_workers=0)
    with pytest.raises(ValueError, match="isolation"):
        CodeVerifier(isolation="vm")
    assert parse_tests(TWO_SUM).cases[1] == ([[3, 2, 4], 6], [1, 2])
    assert parse_tests(MBPP).harness == "assert" and parse_tests(MBPP).entry_point is None


def test_make_verifier_selects_by_task():
    math = make_verifier("math", seconds=3)
    assert isinstance(math, MathVerifier) and math.seconds == 3
    assert math(["so \\boxed{2}", "The answer is 5", "no answer"], ["2", "4", "1"]) == [True, False, False]
    code = make_verifier("code", max_workers=1, limits=LIMITS, isolation="process")
    assert isinstance(code, CodeVerifier) and code.isolation == "process"
    assert code([_block("print(int(input()) ** 2)\n")], [SQUARE]) == [True]
    assert make_verifier("none") is None
    with pytest.raises(ValueError, match="task must be one of"):
        make_verifier("sql")
    with pytest.raises(ValueError, match="takes no options"):
        make_verifier("none", seconds=1)
