"""How a token is drawn: the tempered, top-k/top-p filtered distribution, one uniform number per row, and cutting
responses at their end tokens. Pure functions on tensors; every generation engine draws through them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingConfig:
    """How one generation call samples.

    Args:
        max_new_tokens: the longest response; longer ones are cut and counted as truncated.
        temperature: sampling temperature; 0 means greedy decoding.
        top_p: nucleus sampling mass (1.0 turns it off).
        top_k: sample among the k most likely tokens (0 turns it off).
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filtered_logprobs(logits: Tensor, sampling: SamplingConfig) -> Tensor:
    """[B, V] log-probs of the distribution a token is drawn from: logits / T, then top-k, then top-p, renormalised.

    Greedy decoding draws from the plain distribution (its argmax), so that is what it returns for ``temperature 0``.
    """
    logits = logits.float()
    if sampling.greedy:
        return logits.log_softmax(-1)
    if sampling.temperature != 1:
        logits = logits / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        # Keep the most likely tokens until their mass reaches top_p (the first one always).
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop_sorted = probs.cumsum(-1) - probs >= sampling.top_p
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.log_softmax(-1)


def draw(logprobs: Tensor, u: Tensor | None) -> tuple[Tensor, Tensor]:
    """[B] tokens and their [B] log-probs from [B, V] log-probs: the argmax when ``u`` is None, else the inverse CDF
    at the [B] uniform numbers ``u`` (one per row; the same distribution as ``torch.multinomial``, with one random
    number per row instead of a pass of random numbers over the whole vocabulary)."""
    if u is None:
        token = logprobs.argmax(-1)
        return token, logprobs.gather(-1, token[:, None])[:, 0]
    cdf = logprobs.exp().cumsum(-1)
    target = u.to(cdf.dtype)[:, None] * cdf[:, -1:]
    token = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)[:, 0]
    chosen = logprobs.gather(-1, token[:, None])[:, 0]
    if bool(torch.isneginf(chosen).any()):
        # Rounding at the top of cdf can land on trailing tokens without mass: take the likeliest instead.
        token = torch.where(torch.isneginf(chosen), logprobs.argmax(-1), token)
        chosen = logprobs.gather(-1, token[:, None])[:, 0]
    return token, chosen


def cut_at_eos(tokens: Tensor, eos_ids: list[int], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Mask everything after the first end token of each row (the token itself stays).

    Returns the ids with pad after the end, the mask and the per-row truncated flags.
    """
    is_eos = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device))
    # Tokens strictly after the first end token: the running count of end tokens before them is positive.
    after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return tokens.masked_fill(after, pad_id), ~after, ~is_eos.any(-1)
