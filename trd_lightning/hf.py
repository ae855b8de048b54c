"""Loading Hugging Face causal LMs and tokenizers by hub name or local path, and reading their hidden states."""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from trd_lightning.data.demo import world

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def locate(name: str) -> str:
    """Where ``from_pretrained`` should look for ``name``: a demo name's folder, a local path, or a hub id.

    ``trd-demo/student``, ``trd-demo/teacher`` and ``trd-demo/tokenizer`` become the demo world's folders. A name
    that can only be a local path (not a valid hub id, or one whose first folder exists here, like
    ``runs/student`` beside a ``runs`` folder) and does not exist raises a FileNotFoundError naming it, instead of
    the hub's repo-id or connection message.
    """
    name = world.resolve(name)
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    try:
        validate_repo_id(name)
        local = len(path.parts) > 1 and path.parents[-2].is_dir()
    except HFValidationError:
        local = True
    if local:
        raise FileNotFoundError(
            f"Model path {name!r} does not exist: point the option at a folder written by save_pretrained, "
            "or give a Hugging Face hub id such as 'Qwen/Qwen3-0.6B'."
        )
    return name


def load_config(name: str, trust_remote_code: bool = False):
    """The model config alone: cheap, used to check inputs before any weights are loaded.

    Args:
        name: a hub id, a local folder, or a demo name (see ``locate``).
        trust_remote_code: allow models with custom code from the hub.
    """
    return AutoConfig.from_pretrained(locate(name), trust_remote_code=trust_remote_code)


def load_tokenizer(name: str, trust_remote_code: bool = False):
    """A left-padding tokenizer with a pad token (the end-of-sequence token when it has none).

    Args:
        name: a hub id, a local folder, or a demo name (see ``locate``).
        trust_remote_code: allow tokenizers with custom code from the hub.
    """
    tokenizer = AutoTokenizer.from_pretrained(locate(name), trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name: str, dtype: str = "float32", trust_remote_code: bool = False) -> nn.Module:
    """A causal LM in ``dtype``.

    Args:
        name: a hub id, a local folder, or a demo name (see ``locate``).
        dtype: float32, bfloat16 or float16.
        trust_remote_code: allow models with custom code from the hub.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}.")
    return AutoModelForCausalLM.from_pretrained(locate(name), dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first real token, as ``generate`` counts them under left padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The final hidden states of a causal LM (before its output head), without computing any logits."""
    out = model.get_decoder()(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state


def output_head(model: nn.Module):
    """Hidden states to logits, with the model's final soft-capping when its config has one."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if not cap:
        return head
    return lambda h: torch.tanh(head(h) / cap) * cap
