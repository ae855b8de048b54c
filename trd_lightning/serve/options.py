"""What a client of a served model is set with (``ServiceOptions``) and what it raises (``ServiceError``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# The losses a served teacher's top-k scores can feed.
SERVED_LOSSES = ("topk", "sampled_token")


@dataclass(frozen=True)
class ServiceOptions:
    """How the trainer talks to a served model (``trd serve``, or any server of vLLM's completions protocol).

    Args:
        timeout: seconds one request may take, connecting and waiting for the reply included; a slower request
            fails and is retried.
        retries: further tries after a request fails (a timeout, a refused connection, a 5xx reply), each after
            an exponential backoff; then the run stops with a checkpoint.
        backoff: seconds before the first retry; every next retry waits twice as long as the one before.
        max_concurrency: requests in flight at once from one process (the server batches concurrent requests).
        rows_per_request: rows one request carries where no seed tells them apart (greedy rewrites, teacher
            scores); a sampled rewrite goes alone, with its row's seed (a request has one seed).
        api_key_env: the environment variable holding the service's API key (``vllm serve --api-key``), sent as
            a bearer token; None sends none. The key itself never goes into a config or a checkpoint.
    """

    timeout: float = 600.0
    retries: int = 4
    backoff: float = 2.0
    max_concurrency: int = 32
    rows_per_request: int = 8
    api_key_env: str | None = None

    def __post_init__(self) -> None:
        if not self.timeout > 0:
            raise ValueError(f"service timeout must be > 0 seconds, got {self.timeout}.")
        if self.retries < 0:
            raise ValueError(f"service retries must be >= 0, got {self.retries}.")
        if self.backoff < 0:
            raise ValueError(f"service backoff must be >= 0 seconds, got {self.backoff}.")
        if self.rows_per_request < 1:
            raise ValueError(f"service rows_per_request must be at least 1, got {self.rows_per_request}.")
        if self.max_concurrency < 1:
            raise ValueError(f"service max_concurrency must be at least 1, got {self.max_concurrency}.")

    def api_key(self) -> str | None:
        """The API key from ``api_key_env``; a variable named but unset is an error naming it."""
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ValueError(
                f"The service's api_key_env names {self.api_key_env}, which is not set: export {self.api_key_env} "
                "with the server's API key, or set api_key_env: null."
            )
        return key


class ServiceError(RuntimeError):
    """A served model failed: not up, slow past its retries, gone, mismatched with the student, or malformed.

    Attributes:
        url: the service's address.
    """

    def __init__(self, url: str, message: str) -> None:
        super().__init__(message)
        self.url = url


def check_served_teacher(teacher_kind: str, loss: str, temperature: float, support: str) -> None:
    """The module settings a served teacher allows; each error names the fix (raised at construction)."""
    if teacher_kind != "frozen":
        raise ValueError(
            "model.teacher_url serves a frozen teacher; a shared (OPSD) self-teacher is the student itself and is not "
            "served: set model.teacher_kind: frozen, or drop model.teacher_url."
        )
    if loss not in SERVED_LOSSES:
        raise ValueError(
            f"model.loss: {loss} needs the teacher's full vocabulary, which a served teacher does not send (only its "
            "top-k log-probs): set model.loss: topk (with loss_top_k_tail) or sampled_token, or drop model.teacher_url."
        )
    if temperature != 1.0:
        raise ValueError(
            "A served teacher's prompt_logprobs are untempered: set model.loss_temperature: 1.0 with model.teacher_url."
        )
    if loss == "topk" and support != "teacher":
        raise ValueError(
            "With model.teacher_url the top-k support is the teacher's (the service sends its top-k only): set "
            "model.loss_top_k_support: teacher."
        )


def check_url(url: str | None, option: str) -> None:
    """A service address must be an http(s) URL; None (no service) passes."""
    if url is not None and not url.startswith(("http://", "https://")):
        raise ValueError(f"{option} must be an http:// or https:// address such as http://localhost:8000, got {url!r}.")


# Checkpoints hold these options among the hyperparameters: allowlisted for torch's weights-only unpickling.
torch.serialization.add_safe_globals([ServiceOptions])
