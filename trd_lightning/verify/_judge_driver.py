"""Assert-style harness, the judge's side: run the dataset's test code, which never shares an interpreter with the
program.

The names the test code uses and the program defines become stand-ins here: a function of the program is a proxy
whose every call crosses to the program's interpreter (the socket the sandbox passed in) with its arguments as plain
data, and whose result comes back as fresh builtin objects (``_wire.py``, whose text the harness puts in front of
this one); a class of the program (``class Solution``) makes objects that stay in the program, held here by number,
whose methods cross the same way; a module the program imported is imported here (the standard library's and
numpy's only); plain data is copied. Names of builtins always stay the judge's own. A value that does not cross
fails its call, and fails the verdict even if the test code catches the error.

The verdict is one JSON line on a private copy of stdout (the test code's prints go to stderr): ``passed`` with the
token from ``harness.json``, which the program's interpreter never holds, or a status and its reason. Only the
standard library may be used here (the test code may import what it likes).
"""

import builtins
import json
import os
import sys
import types

if __name__ != "__main__":  # imported (by tests); run in the sandbox, the text of _wire.py comes before this one
    from trd_lightning.verify._wire import NotPlain, decode, encode, receive, send

_BUILTIN_NAMES = frozenset(dir(builtins))


class _Crossing(BaseException):  # not an Exception: a test's ``except Exception`` does not hide it (and the verdict
    pass  # fails anyway: the first such failure is kept)


class _Program:
    """The program's interpreter, reached through the socket; remembers the first call that could not cross."""

    def __init__(self, fd, max_bytes):
        self.writer, self.reader = os.fdopen(fd, "wb"), os.fdopen(os.dup(fd), "rb")
        self.max_bytes, self.failure, self.ended = max_bytes, None, False

    def fail(self, reason, ended=False):
        if self.failure is None:
            self.failure, self.ended = reason[:300], ended
        raise _Crossing(self.failure)

    def request(self, message, what):
        if self.failure is not None:
            raise _Crossing(self.failure)
        try:
            send(self.writer, message)
            return receive(self.reader, self.max_bytes)
        except (EOFError, OSError):
            self.fail(f"the program ended during {what}", ended=True)
        except ValueError as error:
            self.fail(f"the program's reply to {what} is unreadable: {error}")

    def exchange(self, op, what, args=(), kwargs=None, **fields):
        try:
            message = {"op": op, **fields, "args": encode(list(args), _number), "kwargs": encode(dict(kwargs or {}))}
        except NotPlain as error:
            self.fail(f"the tests pass {error} to {what}, which does not cross")
        return self.request(message, f"the call to {what}")

    def result(self, reply, what):
        if "value" in reply:
            try:
                return decode(reply["value"])
            except ValueError as error:
                self.fail(f"{what} returned {error}")
        if "raised" in reply and type(reply["raised"]) is dict:
            raise _exception(self, reply["raised"], what)
        if "refused" in reply:
            self.fail(f"{what} returned {str(reply['refused'])[:120]}, which does not cross (only plain data does)")
        self.fail(f"the program's reply to the call to {what} is unreadable")


def _exception(program, raised, what):
    """The exception to raise in the tests for one the program raised: the same builtin class where the program's
    derives from one, so a test that expects ``ValueError`` still sees one; never a ``BaseException`` outside
    ``Exception`` (``SystemExit`` in the program fails the verdict)."""
    name, kind, message = str(raised.get("builtin")), str(raised.get("type")), str(raised.get("message"))[:1000]
    cls = getattr(builtins, name, None) if name in _BUILTIN_NAMES else None
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        program.fail(f"{what} raised {kind}: {message}"[:300])
    try:
        error = cls(message)
    except Exception:
        error = RuntimeError(f"{kind}: {message}")
    error.add_note(f"(raised by the program in {what} as {kind})")
    return error


class _Remote:
    """An object that stays in the program, held by number; attributes that are not dunders cross on use."""

    def __getattr__(self, name):  # only called for names the object does not have here
        if name.startswith("__"):
            raise AttributeError(name)
        program, label = _REMOTES[id(self)][1], f"{type(self).__name__}.{name}"
        reply = program.exchange("attr", label, handle=self._number, name=name)
        if reply.get("callable") is True:
            return _method(program, self._number, label, name)
        return program.result(reply, label)

    def __setattr__(self, name, value):
        _REMOTES[id(self)][1].fail(f"the tests set {type(self).__name__}.{name}, which does not cross")

    def __repr__(self):
        return f"<{type(self).__name__} object #{self._number} of the program>"


_REMOTES = {}  # id of a stand-in -> (the stand-in, the program)


def _number(value):
    return value._number if isinstance(value, _Remote) and id(value) in _REMOTES else None


def _method(program, number, label, name):
    def method(*args, **kwargs):
        return program.result(program.exchange("method", label, args, kwargs, handle=number, name=name), label)

    method.__name__ = method.__qualname__ = name
    return method


def _function(program, name):
    def proxy(*args, **kwargs):
        return program.result(program.exchange("call", name, args, kwargs, name=name), name)

    proxy.__name__ = proxy.__qualname__ = name
    return proxy


def _class(program, name):
    def new(cls, *args, **kwargs):
        reply = program.exchange("new", name, args, kwargs, name=name)
        if type(reply.get("handle")) is not int:
            program.result(reply, name)  # raises: the program's error, or why the reply is unreadable
            program.fail(f"the program's reply to the call to {name} is unreadable")
        instance = object.__new__(cls)
        object.__setattr__(instance, "_number", reply["handle"])
        _REMOTES[id(instance)] = (instance, program)
        return instance

    return type(name, (_Remote,), {"__new__": new, "__init__": lambda self, *args, **kwargs: None})


class _Opaque:
    """A name of the program whose value does not cross: any use fails the verdict."""

    def __init__(self, program, name, what):
        object.__setattr__(self, "_fail", lambda: program.fail(f"the tests use {name}, {what}, which does not cross"))

    def __getattr__(self, name):
        self._fail()

    def __call__(self, *args, **kwargs):
        self._fail()

    def __eq__(self, other):
        self._fail()

    __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __eq__
    __hash__ = __bool__ = __len__ = __iter__ = __repr__ = __str__ = lambda self: self._fail()


def _stand_in(program, name, info):
    kind = info.get("kind") if type(info) is dict else None
    if kind == "function":
        return _function(program, name)
    if kind == "class":
        return _class(program, name)
    if kind == "data":
        try:
            return decode(info.get("value"))
        except ValueError as error:
            return _Opaque(program, name, str(error))
    if kind == "module" and type(info.get("module")) is str:
        module = info["module"]
        if module.split(".")[0] in sys.stdlib_module_names | {"numpy"}:
            try:
                import importlib  # here, not at the top: each import costs the judge's start time

                return importlib.import_module(module)
            except ImportError:
                pass
        return _Opaque(program, name, f"the module {module[:60]}")
    return _Opaque(program, name, str(info.get("what", "a value of the program"))[:120] if kind else "unreadable")


def _names(code):
    """Every global or attribute name the code (and the functions it defines) mentions."""
    names, stack = set(), [code]
    while stack:
        code = stack.pop()
        names.update(code.co_names)
        stack.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return names


def _where(error):
    import traceback  # only for a failure: importing it costs a passing check about 10 ms

    lines = [f.lineno for f in traceback.extract_tb(error.__traceback__) if f.filename == "tests.py"]
    text = " ".join([f"{type(error).__name__}: {error}".strip().rstrip(":"), *getattr(error, "__notes__", ())])
    return f"{text} (tests.py line {lines[-1]})" if lines else text


def _judge(spec, program):
    """The verdict of the tests: ``(status, detail)``."""
    try:
        code = compile(spec["code"], "tests.py", "exec")
    except (SyntaxError, ValueError) as error:
        return "runtime_error", f"the tests do not compile: {error}"
    entry_point = spec["entry_point"]
    wanted = (_names(code) - _BUILTIN_NAMES) | ({entry_point} if entry_point else set())
    namespace = {"__name__": "tests", "__builtins__": builtins}
    try:
        found = program.request({"op": "describe", "names": sorted(wanted)}, "its start").get("names")
        if type(found) is not dict:
            program.fail("the program's reply to the judge's first question is unreadable")
        for name in wanted & set(found):
            namespace[name] = _stand_in(program, name, found[name])
    except _Crossing:
        return "runtime_error", program.failure
    if entry_point and not isinstance(namespace.get(entry_point), (types.FunctionType, type)):
        return "runtime_error", f"the program defines no function {entry_point!r}"
    status, detail = "passed", ""
    try:
        exec(code, namespace)
    except _Crossing:
        pass
    except AssertionError as error:
        status, detail = "wrong_answer", _where(error)
    except BaseException as error:  # anything else ends the tests: SystemExit of the test code too
        status, detail = "runtime_error", _where(error)
    if program.failure is not None:  # also when the test code caught the error
        return "runtime_error", program.failure
    return status, detail


def _main():
    with open("harness.json") as file:
        spec = json.load(file)
    os.remove("harness.json")
    channel = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    program = _Program(spec["fd"], spec["max_bytes"])
    status, detail = _judge(spec, program)
    outcome = {"status": status, "detail": detail[:300], "program_ended": program.ended}
    if status == "passed":
        outcome["token"] = spec["token"]
    channel.write(json.dumps(outcome) + "\n")
    channel.flush()


if __name__ == "__main__":  # run by the sandbox as its main script; importing runs nothing
    _main()
