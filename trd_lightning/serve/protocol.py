"""The subset of vLLM's OpenAI-compatible API that ``trd serve`` answers: request models and reply layouts.

The layouts follow vLLM's completion protocol (``vllm/entrypoints/openai/completion/protocol.py``): token-id prompts,
``return_token_ids`` for the generated ids, ``logprobs`` for the generated tokens, ``prompt_logprobs`` (vLLM's
extension) for scoring given sequences, ``/tokenize``, and errors as ``{"error": {message, type, param, code}}``.
``tests/fixtures/vllm_completion.json`` keeps a reply of that protocol; a test holds our replies to its keys.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, Field

# vLLM writes -inf log-probs as this number (JSON has no infinity).
LOGPROB_FLOOR = -9999.0


class CompletionRequest(BaseModel):
    """``POST /v1/completions``. Options outside the subset are accepted only at their neutral values."""

    model: str | None = None
    prompt: list[int] | list[list[int]] | str | list[str]
    max_tokens: int = 16
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    n: int = 1
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    return_token_ids: bool | None = None
    return_tokens_as_token_ids: bool | None = None
    skip_special_tokens: bool = True
    echo: bool = False
    stream: bool = False
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_p: float | None = None
    logit_bias: dict[str, float] | None = None
    use_beam_search: bool = False
    best_of: int | None = None


class TokenizeRequest(BaseModel):
    """``POST /tokenize`` (text prompts)."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class LoadAdapterRequest(BaseModel):
    """``POST /v1/load_lora_adapter``: a peft adapter directory, served under ``lora_name``."""

    lora_name: str
    lora_path: str
    load_inplace: bool = False


class RpcRequest(BaseModel):
    """``POST /collective_rpc`` (vLLM's development mode); ``trd serve`` answers ``reload_weights`` only."""

    method: str
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)


class BadRequest(ValueError):
    """A request this server cannot answer, with the HTTP status and the field at fault."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.status = param, status


# Options accepted only at the value that turns them off: (name, neutral values).
_NEUTRAL = {
    "echo": (False,),
    "stream": (False,),
    "stop": (None, "", []),
    "stop_token_ids": (None, []),
    "ignore_eos": (False,),
    "min_tokens": (0,),
    "presence_penalty": (None, 0.0),
    "frequency_penalty": (None, 0.0),
    "repetition_penalty": (None, 1.0),
    "min_p": (None, 0.0),
    "logit_bias": (None, {}),
    "use_beam_search": (False,),
    "best_of": (None, 1),
}


def check_request(request: CompletionRequest, vocab_size: int, max_model_len: int, max_logprobs: int) -> None:
    """Raise ``BadRequest`` for what this server does not do, or for values out of range."""
    for name, neutral in _NEUTRAL.items():
        if getattr(request, name) not in neutral:
            raise BadRequest(f"trd serve does not support {name}={getattr(request, name)!r}.", name)
    if not prompt_rows(request.prompt):
        raise BadRequest("prompt must be token ids: a list of ints or a list of such lists, none empty.", "prompt")
    if request.max_tokens < 1:
        raise BadRequest(f"max_tokens must be at least 1, got {request.max_tokens}.", "max_tokens")
    if request.n < 1:
        raise BadRequest(f"n must be at least 1, got {request.n}.", "n")
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(request, name)
        if value is not None and (value < 0 or value > max_logprobs):
            raise BadRequest(
                f"{name}={value} is outside [0, {max_logprobs}]: start the server with a larger --max-logprobs.", name
            )
    for row in prompt_rows(request.prompt):
        bad = [t for t in row if not 0 <= t < vocab_size]
        if bad:
            raise BadRequest(f"Token id {bad[0]} is out of vocabulary (size {vocab_size}).", "prompt")
        if len(row) + request.max_tokens > max_model_len:
            raise BadRequest(
                f"This model's maximum context length is {max_model_len} tokens; the prompt has {len(row)} and "
                f"max_tokens is {request.max_tokens}.",
                "max_tokens",
            )


def prompt_rows(prompt: Any) -> list[list[int]]:
    """The token-id rows of a prompt (one list, or a list of lists); [] for text prompts or empty rows."""
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(r, list) and r for r in prompt):
        if all(isinstance(t, int) for r in prompt for t in r):
            return prompt
    return []


def error_body(message: str, status: int, param: str | None = None) -> dict:
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def model_list(name: str, root: str, max_model_len: int, vocab_size: int, adapters: list[str] = ()) -> dict:
    """``GET /v1/models``: the base model's card, then one per loaded adapter (its ``parent`` the base, as vLLM
    lists them); ``vocab_size`` is our extension (vLLM's cards have none), read where present."""

    def card(model: str, parent: str | None) -> dict:
        return {
            "id": model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "trd-lightning",
            "root": root,
            "parent": parent,
            "max_model_len": max_model_len,
            "permission": [],
            "vocab_size": vocab_size,
        }

    return {"object": "list", "data": [card(name, None), *(card(a, name) for a in adapters)]}


def completion_reply(model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "service_tier": None,
        "system_fingerprint": None,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
            "prompt_tokens_details": None,
        },
        "kv_transfer_params": None,
    }


def choice(
    index: int,
    text: str,
    finish_reason: str,
    stop_reason: int | None,
    logprobs: dict | None,
    token_ids: list[int] | None,
    prompt_logprobs: list[dict | None] | None,
    prompt_token_ids: list[int] | None,
) -> dict:
    return {
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
        "stop_reason": stop_reason,
        "token_ids": token_ids,
        "prompt_logprobs": prompt_logprobs,
        "prompt_token_ids": prompt_token_ids,
    }


def completion_logprobs(tokens: list[str], token_logprobs: list[float], top: list[dict[str, float]]) -> dict:
    """The OpenAI ``logprobs`` object of the generated tokens (``text_offset`` counts characters of ``tokens``)."""
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {
        "text_offset": offsets,
        "token_logprobs": [max(x, LOGPROB_FLOOR) for x in token_logprobs],
        "tokens": tokens,
        "top_logprobs": [{k: max(v, LOGPROB_FLOOR) for k, v in t.items()} for t in top],
    }


def position_logprobs(entries: list[tuple[int, float, int]], decode) -> dict[str, dict]:
    """One position of ``prompt_logprobs``: ``{token id: {logprob, rank, decoded_token}}``, the prompt's token first,
    then the top-k by rank (vLLM's order; a prompt token among the top-k appears once)."""
    out: dict[str, dict] = {}
    for token, logprob, rank in entries:
        out[str(token)] = {"logprob": max(logprob, LOGPROB_FLOOR), "rank": rank, "decoded_token": decode(token)}
    return out


class ModelInfo(BaseModel):
    """What the server says about itself."""

    name: str
    root: str
    max_model_len: int
    vocab_size: int
    max_logprobs: int = Field(ge=0)
