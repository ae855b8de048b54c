"""Answer checking through math-verify: ``\\boxed{}`` answers and plain final answers.

Only math answers are checked here; generated programs are checked by :mod:`trd_lightning.verify.code`.

Extraction is math-verify's: the answer comes from the strongest anchor present ("final answer is", then
``\\boxed{}``, then "answer", then any ``$...$`` LaTeX or plain number), and among matches of one kind the last one
wins. On top of that, only the text from the LAST ``\\boxed`` on is read when there is one: math-verify alone joins
boxes that are close or separated by "and", "or", "," or ";" within 70 characters into one set, so a self-correction
such as ``\\boxed{2}. Hmm, wait: \\boxed{3}`` would read as {2, 3} and match neither. A plain-text ``pi`` counts as
``\\pi`` (LaTeX would read it as p*i). Plain text outside ``$...$`` or a box yields numbers and digit-operator
expressions such as ``3/4`` only: ``sqrt(2)`` or ``2*pi`` there are not read.

Timeouts: math-verify bounds its work with SIGALRM, which only a process's main thread may use. There (the training
loop, each dataloader worker) the limit is passed through. Any other thread hands the check to a helper process and
waits at most ``seconds``: a Python thread cannot be stopped, and sympy evaluating ``9^{9^{9}}`` holds the GIL inside
one C call, so even a join timeout in the waiting thread would never return. The helper is POSIX only (``select``).
"""

from __future__ import annotations

import os
import pickle
import re
import select
import subprocess
import sys
import threading

# The helper loads this file by path: importing the package would pull in torch and lightning for nothing.
_BOOT = (
    "import importlib.util as u, sys; s = u.spec_from_file_location('trd_verify_helper', sys.argv[1]); "
    "m = u.module_from_spec(s); s.loader.exec_module(m); m._serve()"
)
# Plain-text pi, which LaTeX parsing would read as the product p*i.
_PI = re.compile(r"(?<![\\a-zA-Z])pi(?![a-zA-Z])")
_STARTUP_SECONDS = 120  # importing sympy on a busy machine; not charged to the first check
_helper: subprocess.Popen | None = None
_lock = threading.Lock()


def _forget_helper() -> None:
    # A forked child (dataloader worker) must not share its parent's pipes or a lock held at fork time.
    global _helper, _lock
    _helper, _lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_helper)


def _parse(text: str, seconds: int) -> list:
    # Imported on first use: math-verify brings sympy's LaTeX parser, which runs without answers never need.
    from math_verify import parse

    try:
        return parse(text, parsing_timeout=seconds)
    except Exception:  # a malformed rollout is a wrong answer, never a crash
        return []


def _parse_answer(text: str, seconds: int) -> list:
    text = _PI.sub(r"\\pi", text)
    last_box = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    return _parse(text[max(last_box, 0) :], seconds)


def _is_correct(response: str, gold: str, seconds: int) -> bool:
    target = _parse_answer(response, seconds)
    # A bare gold parses as LaTeX only inside an environment: plain, ``2\pi`` would read as 2 and ``(1, 2)`` as 2.
    reference = _parse_answer(f"\\boxed{{{gold}}}", seconds) or _parse_answer(gold, seconds)
    if not target or not reference:
        return False
    from math_verify import verify

    try:
        return bool(verify(reference, target, timeout_seconds=seconds))
    except Exception:
        return False


def _serve() -> None:
    """Helper process loop: answers pickled ``(name, args)`` requests on stdin, one at a time."""
    out, sys.stdout = sys.stdout.buffer, sys.stderr  # stray prints must not corrupt the replies
    functions = {"parse_answer": _parse_answer, "is_correct": _is_correct}
    import math_verify  # noqa: F401  (before "ready": the startup wait pays for the import, not the first check)

    pickle.dump("ready", out)
    out.flush()
    while True:
        try:
            name, args = pickle.load(sys.stdin.buffer)
        except EOFError:  # the parent is gone
            return
        pickle.dump(functions[name](*args), out)
        out.flush()


def _receive(helper: subprocess.Popen, seconds: float):
    if not select.select([helper.stdout], [], [], seconds)[0]:
        raise TimeoutError(f"no answer within {seconds}s")
    return pickle.load(helper.stdout)


def _off_main_thread(name: str, args: tuple, seconds: int, default):
    global _helper
    with _lock:
        try:
            if _helper is None or _helper.poll() is not None:
                cmd = [sys.executable, "-c", _BOOT, os.path.abspath(__file__)]
                _helper = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                _receive(_helper, _STARTUP_SECONDS)
            pickle.dump((name, args), _helper.stdin)
            _helper.stdin.flush()
            return _receive(_helper, seconds)
        except BaseException as error:  # timeout, a dead helper, or Ctrl-C: a reply may still come, so never reuse it
            if _helper is not None:
                _helper.kill()  # SIGKILL: the helper may sit inside one long C call
                _helper.wait()
            _helper = None
            if not isinstance(error, Exception):
                raise
            return default


def parse_answer(text: str, seconds: int = 5) -> list:
    """The answers extracted from ``text`` as the module docstring says: sympy values, then the matched string.

    Empty when there is none, on any error and on timeout.
    """
    if threading.current_thread() is threading.main_thread():
        return _parse_answer(text, seconds)
    return _off_main_thread("parse_answer", (text, seconds), seconds, [])


def is_correct(response: str, gold: str, seconds: int = 5) -> bool:
    """Whether the final answer in ``response`` equals ``gold``.

    Args:
        response: A model's reply; its answer is extracted as described in the module docstring.
        gold: The bare reference answer, plain (``1/2``, ``0.5``) or LaTeX (``\\frac{\\sqrt{3}}{2}``).
        seconds: Time limit for each parse and comparison on the main thread, for the whole check elsewhere.

    Returns:
        True when math-verify finds them equal; False when not, on any error and on timeout.
    """
    if threading.current_thread() is threading.main_thread():
        return _is_correct(response, gold, seconds)
    return _off_main_thread("is_correct", (response, gold, seconds), seconds, False)


class MathVerifier:
    """Checks final answers against gold answers, a batch at a time: the math side of the verifier interface.

    ``verifier(responses, references)`` gives ``[is_correct(r, g, seconds) ...]``, the same call form as
    :class:`trd_lightning.verify.CodeVerifier`. The checks run one after another on the calling thread: off the main
    thread they share one helper process anyway.

    Args:
        seconds: Time limit of each check (see :func:`is_correct`).
    """

    def __init__(self, seconds: int = 5) -> None:
        if seconds < 1:
            raise ValueError(f"seconds must be at least 1, got {seconds}")
        self.seconds = seconds

    def __call__(self, responses, references) -> list[bool]:
        """Whether each response's final answer equals the gold answer at the same position."""
        if len(responses) != len(references):
            raise ValueError(f"got {len(responses)} responses but {len(references)} references")
        return [is_correct(r, g, self.seconds) for r, g in zip(responses, references)]
