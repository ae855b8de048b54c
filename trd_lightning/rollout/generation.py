"""Sampling responses with Hugging Face ``generate`` and cutting them at the end-of-sequence token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers import CompileConfig, LogitsProcessor, LogitsProcessorList


@dataclass
class SamplingConfig:
    """How responses are sampled.

    Args:
        max_new_tokens: the longest response; longer ones are cut and counted as truncated.
        temperature: sampling temperature; 0 means greedy decoding.
        top_p: nucleus sampling mass (1.0 turns it off).
        top_k: sample among the k most likely tokens (0 turns it off).
        cache: the key/value cache of ``generate``: ``dynamic`` grows with the sequence; ``static`` is allocated
            once at its full length (prompt + ``max_new_tokens``, the longest seen so far on that model), so every
            decoding step has the same shapes.
        compile: run the decoding steps through ``torch.compile`` (Hugging Face's ``CompileConfig`` defaults, on
            any device); needs ``cache="static"``. The first call per model pays the compilation.
        sampler: how ``generate`` draws a token from the tempered, top-k/top-p filtered distribution:
            ``inverse_cdf`` (one uniform number per row looked up in the cumulative distribution: the same
            distribution, without drawing random numbers over the whole vocabulary at every token, which dominates
            generation on CPU at large vocabularies) or ``multinomial`` (``generate``'s own ``torch.multinomial``).
        decoder: ``native``: a plain loop over the model's forward with a dynamic key/value cache, drawing by
            inverse CDF under the same sampling rules, without ``generate``'s per-token machinery (which dominates
            for small models); honours the model's ``generation_config.min_new_tokens``. ``generate``: Hugging
            Face's, for the static cache, compilation or a model whose forward lacks ``logits_to_keep``.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    cache: Literal["dynamic", "static"] = "dynamic"
    compile: bool = False
    sampler: Literal["multinomial", "inverse_cdf"] = "inverse_cdf"
    decoder: Literal["generate", "native"] = "native"

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}.")
        if self.cache not in ("dynamic", "static"):
            raise ValueError(f"cache must be 'dynamic' or 'static', got {self.cache!r}.")
        if self.sampler not in ("multinomial", "inverse_cdf"):
            raise ValueError(f"sampler must be 'multinomial' or 'inverse_cdf', got {self.sampler!r}.")
        if self.decoder not in ("generate", "native"):
            raise ValueError(f"decoder must be 'generate' or 'native', got {self.decoder!r}.")
        if self.decoder == "native" and (self.cache != "dynamic" or self.compile):
            raise ValueError(
                "the native decoder keeps a dynamic cache and is not compiled: set data.decoder: generate to use "
                "generation_cache: static or compile_generation."
            )
        if self.compile and self.cache != "static":
            raise ValueError(
                "compiling generation needs the static cache (data.generation_cache: static): compiled decoding "
                "steps rely on the fixed shapes a static cache gives them."
            )

    @property
    def draws_itself(self) -> bool:
        """True when ``InverseCdfSampler`` draws the tokens and ``generate`` only takes its one-hot choice."""
        return self.temperature > 0 and self.sampler == "inverse_cdf"

    def generate_kwargs(self) -> dict:
        if self.temperature == 0 or self.draws_itself:
            kwargs = {"do_sample": False, "max_new_tokens": self.max_new_tokens}
        else:
            kwargs = {
                "do_sample": True,
                "temperature": self.temperature,
                "top_p": self.top_p,
                "top_k": self.top_k or None,
                "max_new_tokens": self.max_new_tokens,
            }
        if self.cache == "static":
            kwargs["cache_implementation"] = "static"
            if self.compile:
                config = CompileConfig()
                # generate compiles only on accelerators unless this flag is set (transformers' switch for CPU):
                # an explicit request to compile should hold wherever the model runs.
                config._compile_all_devices = True
                kwargs["compile_config"] = config
            else:
                # On CUDA generate would compile a static-cache model on its own; compiling is the caller's choice.
                kwargs["disable_compile"] = True
        return kwargs


class InverseCdfSampler(LogitsProcessor):
    """Draws each next token itself and leaves ``generate`` (run greedy) a single finite logit to pick.

    Applies the temperature, top-k and top-p, then finds one uniform number per row in the cumulative
    distribution. Keeps the log-probability of each drawn token under that distribution (``logprobs``).
    """

    def __init__(self, sampling: SamplingConfig) -> None:
        self.sampling = sampling
        self.logprobs: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return torch.full_like(scores, float("-inf")).scatter_(-1, self.draw(scores), 0.0)

    def draw(self, scores: torch.Tensor) -> torch.Tensor:
        """[B, 1] tokens drawn from [B, V] logits; their log-probs are appended to ``logprobs``."""
        logits = scores.float()
        if self.sampling.temperature != 1:
            logits = logits / self.sampling.temperature
        if self.sampling.top_k:
            kth = logits.topk(min(self.sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.sampling.top_p < 1:
            # Keep the most likely tokens until their mass reaches top_p (the first one always).
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            probs = sorted_logits.softmax(-1)
            drop_sorted = probs.cumsum(-1) - probs >= self.sampling.top_p
            drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        logp = logits.log_softmax(-1)
        cdf = logp.exp().cumsum(-1)
        u = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)
        chosen = logp.gather(-1, token)
        if bool(torch.isneginf(chosen).any()):
            # Rounding at the top of cdf can land on trailing tokens without mass: take the likeliest instead.
            token = torch.where(torch.isneginf(chosen), logp.argmax(-1, keepdim=True), token)
            chosen = logp.gather(-1, token)
        self.logprobs.append(chosen.squeeze(-1))
        return token


@dataclass
class Rollouts:
    """A batch of sampled responses, right-padded.

    Attributes:
        ids: [B, L] response token ids, end-of-sequence token included, pad after it.
        mask: [B, L] True on response tokens (the end-of-sequence token included).
        truncated: [B] True where no end-of-sequence token came within ``max_new_tokens``.
        behavior_logprobs: [B, L] log-probabilities of the sampled tokens under the sampling distribution
            (temperature, top-k and top-p applied), when requested.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    truncated: torch.Tensor
    behavior_logprobs: torch.Tensor | None = None


def cut_at_eos(
    tokens: torch.Tensor, eos_ids: list[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mask everything after the first end-of-sequence token of each row (the token itself stays).

    Returns the ids with pad after the end, the mask and the per-row truncated flags.
    """
    is_eos = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device))
    # Tokens strictly after the first eos: the running count of eos tokens before them is positive.
    after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    mask = ~after
    return tokens.masked_fill(after, pad_id), mask, ~is_eos.any(-1)


@torch.no_grad()
def sample(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    sampling: SamplingConfig,
    eos_ids: list[int],
    pad_id: int,
    with_logprobs: bool = False,
    synced_gpus: bool = False,
) -> Rollouts:
    """Sample one response per left-padded prompt row (repeat rows for several samples per prompt)."""
    if sampling.decoder == "native":
        return decode(model, input_ids, attention_mask, sampling, eos_ids, pad_id, with_logprobs, synced_gpus)
    drawer = InverseCdfSampler(sampling) if sampling.draws_itself else None
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        return_dict_in_generate=True,
        output_scores=with_logprobs and drawer is None,
        synced_gpus=synced_gpus,
        logits_processor=LogitsProcessorList([drawer]) if drawer else None,
        **sampling.generate_kwargs(),
    )
    tokens = out.sequences[:, input_ids.shape[1] :]
    ids, mask, truncated = cut_at_eos(tokens, eos_ids, pad_id)
    logprobs = None
    if with_logprobs and drawer is not None:
        logprobs = torch.stack(drawer.logprobs[: tokens.shape[1]], dim=1).masked_fill(~mask, 0.0)
    elif with_logprobs:
        # Scores are the processed logits the sampler drew from, one [B, V] tensor per step: reduce each
        # to the sampled token's log-prob at once so the [B, L, V] stack is never built.
        logprobs = torch.stack(
            [
                torch.log_softmax(s.float(), -1).gather(-1, tokens[:, i : i + 1]).squeeze(-1)
                for i, s in enumerate(out.scores)
            ],
            dim=1,
        ).masked_fill(~mask, 0.0)
    return Rollouts(ids=ids, mask=mask, truncated=truncated, behavior_logprobs=logprobs)


@torch.no_grad()
def decode(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    sampling: SamplingConfig,
    eos_ids: list[int],
    pad_id: int,
    with_logprobs: bool = False,
    synced_gpus: bool = False,
) -> Rollouts:
    """``sample`` without ``generate``: prefill, then one forward per token on a dynamic cache.

    Sampled tokens are drawn by ``InverseCdfSampler`` (temperature, top-k, top-p); temperature 0 is greedy.
    Finished rows get ``pad_id``. With ``synced_gpus`` every rank keeps stepping until all ranks are done, so
    sharded models see the same number of forwards everywhere.
    """
    from transformers import DynamicCache

    batch, device = input_ids.shape[0], input_ids.device
    drawer = InverseCdfSampler(sampling) if sampling.temperature > 0 else None
    mask = attention_mask.long()
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=position,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    position = position[:, -1:]
    eos = torch.tensor(eos_ids, device=device)
    min_new = getattr(model.generation_config, "min_new_tokens", None) or 0
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, greedy_logprobs = [], []
    for step in range(sampling.max_new_tokens):
        logits = out.logits[:, -1].float()
        if step < min_new:
            logits[:, eos] = float("-inf")
        if drawer is not None:
            chosen = drawer.draw(logits)[:, 0]
        else:
            chosen = logits.argmax(-1)
            if with_logprobs:
                greedy_logprobs.append(logits.log_softmax(-1).gather(-1, chosen[:, None])[:, 0])
        chosen = chosen.masked_fill(done, pad_id)
        tokens.append(chosen)
        done |= torch.isin(chosen, eos)
        if step == sampling.max_new_tokens - 1 or _all_done(done, synced_gpus):
            break
        mask = torch.cat([mask, mask.new_ones(batch, 1)], 1)
        position = position + 1
        out = model(
            input_ids=chosen[:, None], attention_mask=mask, position_ids=position, past_key_values=cache, use_cache=True
        )
    ids, response_mask, truncated = cut_at_eos(torch.stack(tokens, 1), eos_ids, pad_id)
    logprobs = None
    if with_logprobs:
        values = drawer.logprobs if drawer is not None else greedy_logprobs
        logprobs = torch.stack(values, 1).masked_fill(~response_mask, 0.0)
    return Rollouts(ids=ids, mask=response_mask, truncated=truncated, behavior_logprobs=logprobs)


def _all_done(done: torch.Tensor, synced: bool) -> bool:
    if not synced:
        return bool(done.all())
    flag = done.all().float()
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag)
