"""Assert-style harness, the program's side: load ``solution.py``, then answer the judge's calls until it hangs up.

The judge's interpreter runs the tests and never the program's code; every call its tests make into the program
arrives here as a message on the socket the sandbox passed in (its number is in ``harness.json``), and the result
goes back as plain data (see ``_wire.py``, whose text the harness puts in front of this one). What this process sends
is never trusted: the judge decodes it into fresh builtin objects, so replacing this code changes nothing but what
the program returns. The program's own prints go to stderr. Only the standard library may be used here.
"""

import builtins
import json
import os
import sys
import types

if __name__ != "__main__":  # imported (by tests); run in the sandbox, the text of _wire.py comes before this one
    from trd_lightning.verify._wire import NotPlain, decode, encode, receive, send


def _describe(namespace, names):
    """What each of ``names`` is in the program: a function, a class, a module, plain data, or something else."""
    found = {}
    for name in names:
        if name not in namespace:
            continue
        value = namespace[name]
        if isinstance(value, type):
            found[name] = {"kind": "class"}
        elif isinstance(value, types.ModuleType):
            found[name] = {"kind": "module", "module": value.__name__}
        elif callable(value):
            found[name] = {"kind": "function"}
        else:
            try:
                found[name] = {"kind": "data", "value": encode(value)}
            except NotPlain as error:
                found[name] = {"kind": "other", "what": str(error)}
    return found


def _raised(error):
    """An exception of the program as plain data: the nearest builtin exception class it derives from, and text."""
    try:
        text = str(error)[:1000]
    except BaseException:  # a program's exception whose text cannot be made
        text = "(no text)"
    builtin = next(
        (k.__name__ for k in type(error).__mro__ if getattr(builtins, k.__name__, None) is k and k is not object),
        "BaseException",
    )
    return {"raised": {"builtin": builtin, "type": type(error).__qualname__, "message": text}}


class _Server:
    def __init__(self, namespace):
        self.namespace, self.objects = namespace, {}

    def answer(self, message):
        op = message.get("op")
        if op == "describe":
            return {"names": _describe(self.namespace, message["names"])}
        args = decode(message["args"], self.objects.__getitem__)
        kwargs = decode(message["kwargs"], self.objects.__getitem__)
        if op == "call":
            target = self.namespace[message["name"]]
        elif op == "new":
            target = self.namespace[message["name"]]
        elif op in ("method", "attr"):
            target = getattr(self.objects[message["handle"]], message["name"])
            if op == "attr" and not callable(target):
                return {"value": encode(target)}
            if op == "attr":
                return {"callable": True}
        else:
            raise ValueError(f"unknown request {op!r}")
        result = target(*args, **kwargs)
        if op == "new":
            number = len(self.objects) + 1
            self.objects[number] = result
            return {"handle": number}
        return {"value": encode(result)}


def _main():
    with open("harness.json") as file:
        spec = json.load(file)
    os.remove("harness.json")
    writer, reader = os.fdopen(spec["fd"], "wb"), os.fdopen(os.dup(spec["fd"]), "rb")
    os.dup2(2, 1)
    # A real module, not __main__: a program's own ``if __name__ == "__main__"`` block stays out, and dataclasses or
    # pickle find the module they were defined in.
    module = sys.modules["solution"] = types.ModuleType("solution")
    namespace = module.__dict__
    with open("solution.py") as file:
        exec(compile(file.read(), "solution.py", "exec"), namespace)
    server = _Server(namespace)
    while True:
        try:
            message = receive(reader, spec["max_bytes"])
        except EOFError:
            return
        try:
            reply = server.answer(message)
        except NotPlain as error:
            reply = {"refused": str(error)}
        except BaseException as error:  # the program's own failure, SystemExit included, goes back to the judge
            reply = _raised(error)
        send(writer, reply)


if __name__ == "__main__":  # run by the sandbox as its main script; importing runs nothing
    _main()
