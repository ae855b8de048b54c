"""Offline, CPU-only fixtures: tiny models and tokenizers built in-process and loaded back by path."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from helpers import build_run

from trd_lightning.data.demo.random_model import random_qwen3
from trd_lightning.data.demo.task import make_rows
from trd_lightning.data.demo.tokenizer import build_tokenizer


def save_model(path, tokenizer, seed: int, hidden: int, layers: int, vocab: int | None = None) -> str:
    return random_qwen3(path, tokenizer, hidden, layers, seed, vocab, max_positions=512)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict[str, str]:
    """Paths of a tiny student, a tiny teacher (same tokenizer), one with another vocabulary, and data files."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer()
    paths = {
        "student": save_model(root / "student", tokenizer, seed=1, hidden=16, layers=1),
        "teacher": save_model(root / "teacher", tokenizer, seed=2, hidden=32, layers=2),
        "other_vocab": save_model(
            root / "other_vocab", tokenizer, seed=3, hidden=16, layers=1, vocab=len(tokenizer) + 64
        ),
    }
    for split, (n, seed) in {"train": (64, 0), "validation": (16, 1)}.items():
        file = root / f"{split}.jsonl"
        file.write_text("\n".join(json.dumps(r) for r in make_rows(n, seed)) + "\n")
        paths[split] = str(file)
    return paths


@pytest.fixture
def make_run(tiny, tmp_path):
    """The one way tests build a run: ``make_run(model=..., data=..., callbacks=..., root=..., **trainer)`` gives a
    (trainer, module, datamodule) triple on the tiny models and data, CPU, no validation by default (see
    ``helpers.data_options`` for the DataModule's tiny defaults). ``root`` defaults to the test's temporary folder."""

    def build(model=None, data=None, callbacks=(), root=None, **trainer_kw):
        return build_run(tiny, tmp_path if root is None else root, model, data, callbacks, **trainer_kw)

    return build


@pytest.fixture
def no_weights(monkeypatch):
    """Reaching the weight loader fails the test: what it checks must come from configs and data alone."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr("trd_lightning.module.load_causal_lm", refuse)


@pytest.fixture(scope="module")
def tok(tiny):
    """The tiny models' tokenizer, loaded as the DataModule loads it."""
    from trd_lightning.hf import load_tokenizer

    return load_tokenizer(tiny["student"])
