"""Offline, CPU-only fixtures: tiny models and tokenizers built in-process and loaded back by path."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from trd_lightning.data.demo.task import make_rows
from trd_lightning.data.demo.tokenizer import build_tokenizer


def tiny_config(tokenizer, hidden: int = 32, layers: int = 2, vocab: int | None = None) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=vocab or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def save_model(path, tokenizer, seed: int, **kw) -> str:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(tokenizer, **kw))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


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
