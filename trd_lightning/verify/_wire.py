"""Plain data across the boundary between the judge and the program: a strict encoding, and framed messages.

Both sandboxed interpreters of the assert-style harness run this text (the harness puts it in front of each driver),
and the trainer imports it for its tests. Only the standard library may be used here.

What crosses is plain data only: None, booleans, integers, floats (nan, infinities and -0.0 kept), complex numbers,
strings, bytes, and lists, tuples, dicts, sets and frozensets of them, each told apart (a tuple never becomes a list,
a frozenset never a set). Types are checked exactly (``type(x) is int``), so a subclass of ``int`` or ``str``, an
instance of a program's class, a generator or a function does not cross. numpy scalars and arrays cross as their
``tolist()``, which must itself be plain data. The receiving side rebuilds fresh builtin objects from the message,
so every comparison it makes is the builtins' own, whatever the sender ran.

The encoding is JSON: lists are arrays, numbers and strings are themselves, and everything else is a one-key object
naming its type (``{"t": [...]}`` a tuple, ``{"s": ...}`` a set, ``{"f": ...}`` a frozenset, ``{"d": [[k, v], ...]}``
a dict, ``{"b": base64}`` bytes, ``{"c": [re, im]}`` a complex, ``{"x": hex}`` an integer of more than 4,000 digits,
``{"h": n}`` the handle of an object that stays in the program). A message is 8 bytes of length, then its JSON.
"""

import base64
import binascii
import json
import struct
import sys

PLAIN_DATA = (
    "None, bool, int, float, complex, str, bytes, and list, tuple, dict, set and frozenset of them (exact types)"
)
_BIG = 10**4000  # JSON integers stay under Python's 4,300-digit limit on int <-> str conversion
_HEADER = struct.Struct(">Q")
_TAGS = {"t": tuple, "s": set, "f": frozenset}


class NotPlain(Exception):
    """A value that does not cross: its message says what it is."""


def kind_of(value) -> str:
    """A short description of a value that is not plain data, for a verdict's reason."""
    kind = type(value)
    name = getattr(kind, "__qualname__", kind.__name__)
    for base in (bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset):
        if isinstance(value, base):
            return f"{name} (a subclass of {base.__name__})"
    if kind.__name__ in ("generator", "coroutine", "async_generator"):
        return f"a {kind.__name__}"
    if kind.__name__ in ("function", "builtin_function_or_method", "method", "method-wrapper"):
        return "a function"
    if isinstance(value, type):
        return f"the class {value.__qualname__}"
    module = getattr(kind, "__module__", "")
    return f"{name} (a class of the program)" if module in ("solution", "__main__") else f"{module}.{name}"


def _numpy_plain(value):
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(value, (numpy.ndarray, numpy.generic)):
        return value.tolist()
    raise NotPlain(kind_of(value))


def encode(value, handle=None, _numpy=True):
    """The JSON tree of plain data ``value``.

    Args:
        value: The value.
        handle: Optional; maps a value that is not plain data to a handle number (or None: it does not cross).

    Raises:
        NotPlain: For a value (or a part of one) that does not cross, or one nested too deeply.
    """
    try:
        return _encode(value, handle, _numpy)
    except RecursionError:
        raise NotPlain("a value nested too deeply (or one that contains itself)") from None


def _encode(value, handle, numpy):
    kind = type(value)
    if value is None or kind is bool or kind is str:
        return value
    if kind is int:
        return value if -_BIG < value < _BIG else {"x": format(value, "x")}
    if kind is float:
        return value
    if kind is list:
        return [_encode(item, handle, numpy) for item in value]
    if kind in (tuple, set, frozenset):
        tag = "t" if kind is tuple else "s" if kind is set else "f"
        return {tag: [_encode(item, handle, numpy) for item in value]}
    if kind is dict:
        return {"d": [[_encode(k, handle, numpy), _encode(v, handle, numpy)] for k, v in value.items()]}
    if kind is bytes:
        return {"b": base64.b64encode(value).decode("ascii")}
    if kind is complex:
        return {"c": [value.real, value.imag]}
    if handle is not None:
        number = handle(value)
        if number is not None:
            return {"h": number}
    if numpy:
        return _encode(_numpy_plain(value), handle, False)
    raise NotPlain(kind_of(value))


def decode(tree, resolve=None):
    """Fresh builtin objects from a JSON tree of :func:`encode`; ``resolve(n)`` gives the object of handle ``n``
    (without it, a handle is refused).

    Raises:
        ValueError: For anything but such a tree (an unknown tag, an unhashable key, a bad handle, nesting too deep).
    """
    try:
        return _decode(tree, resolve)
    except (TypeError, KeyError, binascii.Error, RecursionError) as error:
        raise ValueError(f"not plain data: {type(error).__name__}: {error}"[:200]) from None


def _decode(node, resolve):
    kind = type(node)
    if node is None or kind in (bool, int, float, str):
        return node
    if kind is list:
        return [_decode(item, resolve) for item in node]
    if kind is not dict or len(node) != 1:
        raise ValueError(f"not plain data: {kind.__name__}")
    ((tag, body),) = node.items()
    if tag in _TAGS and type(body) is list:
        return _TAGS[tag](_decode(item, resolve) for item in body)
    if tag == "d" and type(body) is list and all(type(p) is list and len(p) == 2 for p in body):
        return {_decode(k, resolve): _decode(v, resolve) for k, v in body}
    if tag == "b" and type(body) is str:
        return base64.b64decode(body.encode("ascii"), validate=True)
    if tag == "c" and type(body) is list and len(body) == 2 and all(type(p) in (int, float) for p in body):
        return complex(body[0], body[1])
    if tag == "x" and type(body) is str and body.lstrip("-").isalnum() and body.isascii():
        return int(body, 16)
    if tag == "h" and type(body) is int and resolve is not None:
        return resolve(body)
    raise ValueError(f"not plain data: tag {tag!r}")


def send(stream, message) -> None:
    """Write one message (a JSON-ready dict) to a binary stream and flush it."""
    data = json.dumps(message, separators=(",", ":")).encode("utf-8")
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def receive(stream, max_bytes):
    """Read one message from a binary stream.

    Raises:
        EOFError: When the other side has gone (no message, or half of one).
        ValueError: For a message over ``max_bytes``, or one that is not a JSON object.
    """
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("the other side ended")
    (length,) = _HEADER.unpack(header)
    if length > max_bytes:
        raise ValueError(f"a message of {length} bytes, more than the limit of {max_bytes}")
    data = stream.read(length)
    if len(data) < length:
        raise EOFError("the other side ended in the middle of a message")
    try:
        message = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise ValueError(f"an unreadable message: {error}"[:200]) from None
    if type(message) is not dict:
        raise ValueError("an unreadable message: not an object")
    return message
