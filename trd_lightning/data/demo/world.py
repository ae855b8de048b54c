"""Where the demo world lives: shipped with the package, or built once into the user's cache."""

from __future__ import annotations

import os
from pathlib import Path

from trd_lightning.data.demo.build import build
from trd_lightning.data.demo.task import make_rows
from trd_lightning.io import atomic_dir

PREFIX = "trd-demo"
PARTS = ("teacher", "student", "tokenizer")
SPLITS = {"train": (4096, 0), "validation": (128, 1), "test": (512, 2)}
_SHIPPED = Path(__file__).parent / "assets"


def world_dir() -> Path:
    """The demo world's folder: the shipped one, else the cache, built there on first use."""
    if (_SHIPPED / "world.json").exists():
        return _SHIPPED
    cache = Path(os.environ.get("TRD_DEMO_CACHE", Path.home() / ".cache" / "trd-lightning" / "demo-world"))
    if not (cache / "world.json").exists():
        with atomic_dir(cache) as tmp:  # a crash mid-build leaves no half-written world behind
            build(tmp)
    return cache


def is_demo(name: str) -> bool:
    return name == PREFIX or name.startswith(PREFIX + "/")


def resolve(name: str) -> str:
    """``trd-demo/teacher`` and ``trd-demo/student`` to local folders; any other name unchanged."""
    if not is_demo(name):
        return name
    part = name[len(PREFIX) + 1 :]
    if part not in PARTS:
        raise ValueError(f"Unknown demo model {name!r}: use one of {[f'{PREFIX}/{p}' for p in PARTS]}.")
    # The tokenizer is saved beside each model; 'tokenizer' names the student's copy.
    return str(world_dir() / ("student" if part == "tokenizer" else part))


def rows(split: str) -> list[dict[str, str]]:
    """The demo dataset's rows for ``split`` (problem, solution, answer), generated from a fixed seed."""
    if split not in SPLITS:
        raise ValueError(f"The demo dataset has splits {list(SPLITS)}, not {split!r}.")
    n, seed = SPLITS[split]
    return make_rows(n, seed)
