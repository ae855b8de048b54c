"""Randomly initialised Qwen3 models of any size on a given tokenizer, saved as a user's model would be.

Tests and benchmarks build their models in-process (nothing is downloaded) and load them back through the
library's own ``from_pretrained`` path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase, Qwen3Config


def random_qwen3(
    folder: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    hidden: int,
    layers: int,
    seed: int,
    vocab: int | None = None,
    max_positions: int = 2048,
) -> str:
    """Save a random Qwen3 (4 query and 2 key/value heads, MLP twice as wide, tied embeddings) with ``tokenizer``.

    Args:
        folder: where the model and the tokenizer are written.
        tokenizer: gives the pad and end tokens and the smallest vocabulary.
        hidden: hidden size (a multiple of 4; each head gets a quarter of it).
        layers: decoder layers.
        seed: seeds the initial weights.
        vocab: the embedding's vocabulary when larger than the tokenizer's (the extra rows are never produced by
            the tokenizer, as in real checkpoints whose embedding is padded).
        max_positions: ``max_position_embeddings``.

    Returns:
        The folder, as a string to pass as a model name.
    """
    config = Qwen3Config(
        vocab_size=max(vocab or 0, len(tokenizer)),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
