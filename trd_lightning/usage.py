"""How ``trd`` reports a user's mistake: one line, ``trd: error: ...``, and exit code 2.

A mistake is an error our checks raise (a ``ValueError``, ``FileNotFoundError`` or ``FileExistsError`` raised in
this package), a served component that failed (``ServiceError``), or the command line or a config that the parser
refuses (an unknown option gets the nearest valid name). Anything else is a bug and keeps its traceback, as does
every error with ``--debug`` or ``TRD_DEBUG=1``.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
DEBUG_FLAG = "--debug"
DEBUG_VARIABLE = "TRD_DEBUG"

# The optimizer is the module's AdamW with its warmup-cosine schedule: LightningCLI's --optimizer and
# --lr_scheduler are not offered, and a user who reaches for them is told what to set instead.
OPTIMIZER_OPTIONS = (
    "the optimizer is the module's AdamW with a warmup-cosine schedule, set by --model.lr, --model.weight_decay, "
    "--model.betas, --model.warmup_ratio and --model.min_lr_ratio"
)


class UsageError(ValueError):
    """A mistake in how ``trd`` was called, with the message that says how to call it."""


def debugging(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether tracebacks are wanted (``--debug`` anywhere, or ``TRD_DEBUG`` set and not 0), and ``argv`` without
    the flag."""
    wanted = DEBUG_FLAG in argv or os.environ.get(DEBUG_VARIABLE, "0") not in ("", "0")
    return wanted, [a for a in argv if a != DEBUG_FLAG]


def is_mistake(err: BaseException) -> bool:
    """Whether ``err`` is a user's mistake that one line reports (see the module docstring)."""
    from trd_lightning.serve.options import ServiceError

    if isinstance(err, (argparse.ArgumentError, UsageError, ServiceError)):
        return True
    if isinstance(err, (ValueError, FileNotFoundError, FileExistsError)):
        return _raised_here(err)
    return False


def _raised_here(err: BaseException) -> bool:
    """Whether ``err`` was raised by this package's own code (the innermost frame of its traceback)."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(PACKAGE)


def one_line(err: BaseException) -> str:
    """The error's message on one line."""
    text = str(err) if not isinstance(err, argparse.ArgumentError) else (err.message or str(err))
    # jsonargparse lists nested errors as "  - ..." bullets.
    lines = [re.sub(r"^-\s+", "", line.strip()) for line in text.strip().splitlines() if line.strip()]
    # jsonargparse repeats a nested error's first line below it.
    unique = [line for i, line in enumerate(lines) if line not in lines[:i]]
    return " ".join(unique) if unique else type(err).__name__


UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)")
UNKNOWN_KEY = re.compile(r"does not accept option '([^']+)'")


def explain_parse_error(message: str, options: list[str]) -> str:
    """The parser's message, with the nearest valid name of an unknown option (``options``: the valid dotted keys)."""
    found = UNRECOGNIZED.search(message)
    if found:
        unknown = [token.split("=")[0] for token in found.group(1).split() if token.startswith("-")]
        if not unknown:
            return message
        optimizer = [name for name in unknown if _optimizer_key(name)]
        if optimizer:
            return unknown_option(optimizer[0], options, "option")
        return "; ".join(unknown_option(name, options, "option") for name in unknown)
    found = UNKNOWN_KEY.search(message)
    if found:
        return unknown_option(found.group(1), options, "config key")
    return message


def unknown_option(name: str, options: list[str], kind: str) -> str:
    key = name.lstrip("-")
    shown = name if kind == "option" else key
    if _optimizer_key(name):
        return f"{shown} is not an option of trd: {OPTIMIZER_OPTIONS}"
    nearest = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    if not nearest:  # a mistyped last part of a known group: compare within that group
        group = key.rpartition(".")[0]
        within = [o for o in options if o.rpartition(".")[0] == group]
        nearest = difflib.get_close_matches(key, within, n=1, cutoff=0.0) if within else []
    if not nearest:
        return f"unknown {kind} {shown} (`trd SUBCOMMAND --help` lists them)"
    suggestion = f"--{nearest[0]}" if kind == "option" else nearest[0]
    return f"unknown {kind} {shown}: did you mean {suggestion}?"


def _optimizer_key(name: str) -> bool:
    return name.lstrip("-").split(".")[0] in ("optimizer", "lr_scheduler")


def parser_options(parser) -> list[str]:
    """Every dotted key a (jsonargparse) parser takes, from its defaults."""
    try:
        defaults = parser.get_defaults()
    except Exception:  # a default config that cannot load: no suggestions
        return []
    return [key for key in defaults.keys() if not key.startswith("__")]


def config_files(argv: list[str]) -> list[str]:
    """The files of ``--config``/``-c`` on a command line."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


def check_not_only_overlays(argv: list[str]) -> None:
    """Refuse a command whose configs are all overlays (a config whose opening comment calls it one), which hold
    only the changes they make to a base config."""
    files = config_files(argv)
    if not files or not all(_is_overlay(f) for f in files):
        return
    example = _usage_line(files[0])
    hint = f", e.g. `{example}`" if example else " (--config BASE.yaml --config OVERLAY.yaml)"
    raise UsageError(
        f"{', '.join(files)} {'is an overlay' if len(files) == 1 else 'are overlays'}: it changes a base config and "
        f"does not run alone; stack it on one{hint}."
    )


def _opening_comment(path: str) -> list[str]:
    try:
        text = Path(path).expanduser().read_text()
    except (OSError, UnicodeDecodeError):
        return []
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    return lines


def _is_overlay(path: str) -> bool:
    return any(re.search(r"\boverlay\b", line, re.IGNORECASE) for line in _opening_comment(path))


def _usage_line(path: str) -> str | None:
    name = Path(path).name
    for line in _opening_comment(path):
        if line.startswith("trd ") and name in line:
            return line
    return None
