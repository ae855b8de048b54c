"""The HTTP side of a served model: requests with timeouts and retries, the start checks, and reading replies.

Works with ``trd serve`` and with any server of vLLM's completions protocol. Every request has a timeout; a request
that times out, cannot connect or gets a 5xx reply is retried after an exponential backoff, and fails with a
``ServiceError`` naming the address once the retries are spent. A reply that does not follow the protocol fails at
once, naming the address and what was wrong.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from trd_lightning.serve.options import ServiceError, ServiceOptions

try:
    import httpx
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError("A served teacher or refiner needs httpx: pip install 'trd-lightning[serve]'.") from error

T = TypeVar("T")
R = TypeVar("R")
# Replies worth another try: the server is busy, restarting, or failed on this batch.
RETRY_STATUS = {408, 429, 500, 502, 503, 504}
# Rounding in a server's float32 log-softmax leaves a log-prob at most this far above 0 (or a mass this far above 1).
LOGPROB_SLACK = 1e-3
# Sent with every generation request: a server fills the options a request leaves out from the model's
# generation_config.json (vLLM applies Qwen2.5's repetition_penalty 1.05 even to greedy decoding), which would draw
# other tokens than in-process generation.
NEUTRAL_SAMPLING = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_p": 0.0}
# A probe text with digits, spacing, punctuation and non-ASCII characters: tokenizers that differ split it apart.
PROBE_TEXT = "Refine: 12 + 7 = 19, so x = -3.5; naïve café ∑ 東京\n  done."


class ServiceClient:
    """Requests to one service, from many threads at once (``map``).

    Args:
        url: the service's address (``http://host:port``, with or without a trailing ``/v1``).
        options: timeout, retries, backoff and concurrency.
        option: the config option that set the address, named in error messages.
    """

    def __init__(self, url: str, options: ServiceOptions, option: str) -> None:
        self.url = url.rstrip("/").removesuffix("/v1")
        self.options, self.option = options, option
        self.model: str | None = None
        self.max_model_len: int | None = None  # the served model's context, read by ``check``
        limits = httpx.Limits(
            max_connections=options.max_concurrency, max_keepalive_connections=options.max_concurrency
        )
        key = options.api_key()
        headers = {"Authorization": f"Bearer {key}"} if key else None
        self._http = httpx.Client(timeout=httpx.Timeout(options.timeout), limits=limits, headers=headers)
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------- requests
    def request(
        self, method: str, path: str, body: dict | None = None, retries: int | None = None, text: bool = False
    ) -> Any:
        """The JSON reply of ``method path`` (its text with ``text``: vLLM answers some calls in plain words),
        retried on timeouts, refused connections and 5xx replies."""
        retries = self.options.retries if retries is None else retries
        last = ""
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(self.options.backoff * 2 ** (attempt - 1))
            try:
                reply = self._http.request(method, self.url + path, json=body)
            except httpx.TimeoutException:
                last = f"no reply within {self.options.timeout:g} s (timeout)"
                continue
            except httpx.TransportError as error:
                last = f"{type(error).__name__}: {error}"
                continue
            if reply.status_code in RETRY_STATUS:
                last = f"HTTP {reply.status_code}: {_message(reply)}"
                continue
            if reply.status_code == 401:
                raise ServiceError(
                    self.url, f"The service at {self.url} ({self.option}) wants an API key: put it in an environment "
                    "variable and name that variable in the service's api_key_env option (e.g. VLLM_API_KEY)."
                )  # fmt: skip
            if reply.status_code != 200:
                raise ServiceError(
                    self.url, f"The service at {self.url} ({self.option}) refused {method} {path}: "
                    f"HTTP {reply.status_code}: {_message(reply)}"
                )  # fmt: skip
            if text or not reply.content:
                return reply.text if text else None
            try:
                return reply.json()
            except ValueError as error:
                raise self.malformed(f"{path} replied with something other than JSON ({error})") from error
        raise ServiceError(
            self.url,
            f"The service at {self.url} ({self.option}) failed {method} {path} {retries + 1} times; last: {last}. "
            "Check that it is up (and not overloaded), or raise the service's timeout and retries.",
        )

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``fn`` over ``items`` with at most ``max_concurrency`` in flight, results in order."""
        if len(items) <= 1:
            return [fn(x) for x in items]
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.options.max_concurrency, thread_name_prefix="trd-service")
        return list(self._pool.map(fn, items))

    def complete(self, body: dict) -> dict:
        """``POST /v1/completions`` for the served model; the reply is checked to hold one choice per prompt."""
        reply = self.request("POST", "/v1/completions", {"model": self.model, **body})
        prompts = body["prompt"]
        expected = (len(prompts) if prompts and isinstance(prompts[0], list) else 1) * body.get("n", 1)
        choices = reply.get("choices") if isinstance(reply, dict) else None
        if not isinstance(choices, list) or len(choices) != expected:
            got = "no choices" if not isinstance(choices, list) else f"{len(choices)} choices"
            raise self.malformed(f"/v1/completions answered with {got} for {expected} expected")
        return reply

    def malformed(self, what: str) -> ServiceError:
        return ServiceError(
            self.url,
            f"The service at {self.url} ({self.option}) sent a malformed reply: {what}. It must speak vLLM's "
            "completions protocol (trd serve, or vllm serve).",
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        self._http.close()

    # --------------------------------------------------------- start checks
    def check(self, tokenizer, vocab_size: int, probe: dict, needed: int | None = None) -> tuple[list[int], dict]:
        """Before any weights load: the service answers, serves the student's tokenizer and vocabulary, holds
        ``needed`` positions (the run's longest request, prompt and new tokens), and takes ``probe`` (a completion
        body: the options the run's requests will use) on the student's last token id; returns the probe's prompt
        and reply, for the caller to read as it will read the run's replies.

        Raises:
            ServiceError: naming the address and the fix.
        """
        try:
            self.request("GET", "/health", retries=min(self.options.retries, 2))
        except ServiceError as error:
            raise ServiceError(
                self.url,
                f"No service answers at {self.url} ({self.option}): start it first (`trd serve --model ...` or "
                f"`vllm serve ...`, see the README), or fix the address. ({error})",
            ) from error
        cards = self.request("GET", "/v1/models")
        data = cards.get("data") if isinstance(cards, dict) else None
        if not data or not isinstance(data[0], dict) or "id" not in data[0]:
            raise self.malformed("/v1/models lists no model")
        self.model = data[0]["id"]
        served = data[0].get("vocab_size")  # trd serve says; vLLM's cards do not
        if served is not None and served != vocab_size:
            raise self.mismatch(f"a vocabulary of {served} where the student's has {vocab_size}")
        self.max_model_len = data[0].get("max_model_len")
        if needed is not None and self.max_model_len is not None and self.max_model_len < needed:
            # vLLM would cut such requests short without a word (it clamps max_tokens to the context left).
            raise ServiceError(
                self.url,
                f"The service at {self.url} ({self.option}) holds {self.max_model_len} positions, but the run's "
                f"longest request needs {needed}: restart it with a larger --max-model-len (vLLM), or lower the "
                "run's prompt and new-token budgets.",
            )
        expected = tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        reply = self.request(
            "POST", "/tokenize", {"model": self.model, "prompt": PROBE_TEXT, "add_special_tokens": False}
        )
        tokens = reply.get("tokens") if isinstance(reply, dict) else None
        if tokens != expected:
            raise self.mismatch(
                f"a tokenizer that splits a probe text into {tokens} where the student's gives {expected}"
            )
        # The student's last id must be valid there (a smaller vocabulary refuses it), with the run's options.
        prompt = [expected[0], vocab_size - 1]
        try:
            return prompt, self.complete({**probe, "prompt": prompt})
        except ServiceError as error:
            raise ServiceError(
                self.url,
                f"{error}\nThe refused probe held the student's last token id ({vocab_size - 1}) and the run's request "
                "options: a model with a smaller vocabulary refuses the id (serve one with the student's vocabulary), "
                "and vLLM refuses more log-probs than its --max-logprobs (restart it with a larger --max-logprobs).",
            ) from error

    def mismatch(self, what: str) -> ServiceError:
        return ServiceError(
            self.url,
            f"The service at {self.url} ({self.option}) serves {self.model!r} with {what}: distillation compares "
            "token ids, so serve a model that shares the student's tokenizer and vocabulary.",
        )


def _message(reply) -> str:
    """The error message of a reply (vLLM's ``{"error": {"message": ...}}``, an older flat one, or the text)."""
    try:
        body = reply.json()
    except ValueError:
        return reply.text[:300]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if "message" in body:
            return str(body["message"])
    return str(body)[:300]


def token_ids(client: ServiceClient, choice: dict, max_tokens: int, vocab_size: int) -> list[int]:
    """The generated ids of a choice (``return_token_ids``), checked against the student's vocabulary."""
    ids = choice.get("token_ids")
    if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
        raise client.malformed("a choice has no token_ids list (the request sets return_token_ids: true)")
    if not ids or len(ids) > max_tokens:
        raise client.malformed(f"a choice has {len(ids)} generated tokens for max_tokens={max_tokens}")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise client.mismatch(f"generated token id {bad[0]}, outside the student's vocabulary of {vocab_size}")
    return ids


def generated_logprobs(client: ServiceClient, choice: dict, count: int) -> list[float]:
    """The log-probs of a choice's generated tokens (``logprobs: 0``)."""
    logprobs = choice.get("logprobs")
    values = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
    if not isinstance(values, list) or len(values) != count or not all(isinstance(v, (int, float)) for v in values):
        raise client.malformed(f"a choice's logprobs.token_logprobs is not {count} numbers")
    if any(v > LOGPROB_SLACK for v in values):
        raise not_logprobs(client, math.exp(max(values)))
    return [float(v) for v in values]


def not_logprobs(client: ServiceClient, what: float) -> ServiceError:
    """A server that sends logits where log-probs belong (vLLM's ``--logprobs-mode raw_logits``)."""
    return ServiceError(
        client.url,
        f"The service at {client.url} ({client.option}) sends scores that are not log-probs ({what:.4g}: a "
        "probability above 1): start vLLM with --logprobs-mode raw_logprobs (its default) or processed_logprobs, "
        "not a *_logits mode.",
    )


def prompt_scores(
    client: ServiceClient, choice: dict, prompt: list[int], tail: int, k: int, vocab_size: int
) -> tuple[list[list[int]], list[list[float]], list[float]]:
    """The last ``tail`` positions of a choice's ``prompt_logprobs``: per position the top-``k`` ids and log-probs
    (by rank) and the log-prob of the prompt's own token there (vLLM always includes it)."""
    positions = choice.get("prompt_logprobs")
    if not isinstance(positions, list) or len(positions) != len(prompt):
        got = "none" if not isinstance(positions, list) else f"{len(positions)} positions"
        raise client.malformed(f"prompt_logprobs has {got} for a prompt of {len(prompt)} tokens")
    ids, values, own = [], [], []
    for at in range(len(prompt) - tail, len(prompt)):
        entries = positions[at]
        if not isinstance(entries, dict) or str(prompt[at]) not in entries:
            raise client.malformed(f"prompt_logprobs[{at}] lacks the prompt's token {prompt[at]}")
        try:
            parsed = sorted((int(e["rank"]), int(t), float(e["logprob"])) for t, e in entries.items())
        except (KeyError, TypeError, ValueError) as error:
            raise client.malformed(
                f"prompt_logprobs[{at}] has an entry without a rank and a logprob ({error})"
            ) from error
        top = parsed[:k]
        if len(top) < k:
            raise client.malformed(f"prompt_logprobs[{at}] holds {len(top)} entries for prompt_logprobs={k}")
        if not all(0 <= t < vocab_size for _, t, _ in top):
            raise client.mismatch(f"a scored token id outside the student's vocabulary of {vocab_size}")
        mass = torch.tensor([v for _, _, v in top], dtype=torch.float64).logsumexp(0).item()
        if mass > LOGPROB_SLACK:  # the top-k of a distribution hold at most all of its mass
            raise not_logprobs(client, math.exp(mass))
        ids.append([t for _, t, _ in top])
        values.append([v for _, _, v in top])
        own.append(float(entries[str(prompt[at])]["logprob"]))
    return ids, values, own
