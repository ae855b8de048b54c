"""Generation behind one protocol: ``generate(prompts, sampling, seeds) -> Rollouts``.

Two in-process implementations share the chunking, the seeds and the draw: ``native`` (a plain decoding loop: prefill,
then one forward per token on a dynamic key/value cache) and ``generate`` (Hugging Face's, for its static cache and
compiled decoding). A served engine (``trd_lightning.serve``) implements the same protocol over HTTP.

Row ``r`` draws its tokens with the uniform numbers of its own seed (``seeds.uniforms``), so a call gives the same
rollouts however its rows are split into chunks (``max_rows``) or spread over processes.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import nn
from transformers import CompileConfig, LogitsProcessor, LogitsProcessorList

from trd_lightning.hf import last_hidden, output_head, position_ids
from trd_lightning.losses import token_logprobs
from trd_lightning.rollout.batch import Prompts, Rollouts, response_rows
from trd_lightning.rollout.sampling import SamplingConfig, cut_at_eos, draw, filtered_logprobs
from trd_lightning.rollout.seeds import uniforms

Decoder = Literal["native", "generate"]


class Generator(Protocol):
    """A model behind the rollout side: it generates responses and scores given ones.

    ``generate`` gives one response per prompt row, row ``r`` drawn with the seed ``seeds[r]``; ``logprobs`` gives
    the [B, L] log-probs of the tokens of ``response`` after ``contexts`` (row by row), 0 off the response mask.
    """

    def generate(self, prompts: Prompts, sampling: SamplingConfig, seeds: Sequence[int]) -> Rollouts: ...

    def logprobs(self, contexts: Prompts, response: Rollouts) -> torch.Tensor: ...


@dataclass(frozen=True)
class EngineOptions:
    """How in-process generation runs (rollouts, rewrites and validation alike).

    Args:
        decoder: ``native`` (a plain decoding loop with a dynamic key/value cache; the least per-token overhead) or
            ``generate`` (Hugging Face's: needed for ``cache: static`` and ``compile``, or for a model whose forward
            lacks ``logits_to_keep``). Both draw tokens the same way (inverse CDF, one uniform number per row).
        cache: ``generate``'s key/value cache: ``dynamic`` (grows with the sequence) or ``static`` (allocated once
            at full length: fixed shapes, needed by ``compile``).
        compile: ``torch.compile`` the decoding steps of ``generate`` (needs ``cache: static``); each model
            compiles on its first generation, and again when its batch size changes or its cache grows.
        max_rows: the most rows generated at once; a call with more rows runs in chunks of this many, which bounds
            the key/value cache. The rollouts do not depend on it. None: every row of a call at once.
    """

    decoder: Decoder = "native"
    cache: Literal["dynamic", "static"] = "dynamic"
    compile: bool = False
    max_rows: int | None = None

    def __post_init__(self) -> None:
        if self.decoder not in ("native", "generate"):
            raise ValueError(f"decoder must be 'native' or 'generate', got {self.decoder!r}.")
        if self.cache not in ("dynamic", "static"):
            raise ValueError(f"cache must be 'dynamic' or 'static', got {self.cache!r}.")
        if self.decoder == "native" and (self.cache != "dynamic" or self.compile):
            raise ValueError(
                "the native decoder keeps a dynamic cache and is not compiled: set data.rollout.decoder: generate to "
                "use generation_cache: static or compile_generation."
            )
        if self.compile and self.cache != "static":
            raise ValueError(
                "compiling generation needs the static cache (data.rollout.generation_cache: static): compiled "
                "decoding steps rely on the fixed shapes a static cache gives them."
            )
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"max_rows (data.rollout.max_generation_rows) must be at least 1, got {self.max_rows}.")


def end_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """Every end token the model declares: its generation config's ``eos_token_id`` (an id or a list) and the
    tokenizer's end token. Chat models often end a turn with a token other than the tokenizer's ``eos_token``."""
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(declared) if isinstance(declared, (list, tuple)) else ([] if declared is None else [declared])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("The model declares no end token and the tokenizer has none: rollouts could never end.")
    return list(dict.fromkeys(int(i) for i in ids))


class LocalEngine:
    """In-process generation from ``model`` (a Hugging Face causal LM), in chunks of ``options.max_rows`` rows.

    Args:
        model: the model to generate from; it is put in eval mode for the call and restored after.
        eos_ids: the end tokens (``end_token_ids``).
        pad_id: the token written after a response's end.
        options: decoder, cache and chunk size.
        synced: several processes generate together from a sharded model: every process runs the same number of
            chunks and decoding steps (until all are done), since each forward is collective.
    """

    def __init__(
        self, model: nn.Module, eos_ids: list[int], pad_id: int, options: EngineOptions, synced: bool = False
    ) -> None:
        self.model, self.eos_ids, self.pad_id, self.options, self.synced = model, eos_ids, pad_id, options, synced

    @torch.no_grad()
    def generate(self, prompts: Prompts, sampling: SamplingConfig, seeds: Sequence[int]) -> Rollouts:
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: one seed per row.")
        size = self.options.max_rows or max(len(prompts), 1)
        starts = list(range(0, len(prompts), size))
        if self.synced:
            starts += [len(prompts)] * (_agreed_max(len(starts), prompts.ids.device) - len(starts))
        parts = []
        with _eval(self.model):
            for start in starts:
                rows = slice(start, start + size)
                chunk, chunk_seeds = prompts.rows(rows), list(seeds[rows])
                if not chunk_seeds:  # this process has no rows left while others do: step along on a stand-in row
                    self._run(
                        Prompts(prompts.ids.new_full((1, 1), self.eos_ids[0]), prompts.mask.new_ones((1, 1))),
                        sampling,
                        [0],
                    )
                    continue
                parts.append(self._run(chunk, sampling, chunk_seeds))
        if not parts:
            empty = prompts.ids.new_zeros((0, 0))
            return Rollouts(empty, empty.bool(), empty.new_zeros(0).bool(), empty.float())
        return Rollouts.cat(parts, self.pad_id)

    @torch.no_grad()
    def logprobs(self, contexts: Prompts, response: Rollouts, chunk_size: int = 1024) -> torch.Tensor:
        mask = response.mask.bool()
        if not len(contexts):
            if self.synced:  # the forward is collective: step along on a stand-in row
                stand_in = contexts.ids.new_full((1, 1), self.eos_ids[0])
                last_hidden(self.model, stand_in, torch.ones_like(stand_in))
            return torch.zeros(mask.shape, device=mask.device)
        ids = torch.cat([contexts.ids, response.ids.to(contexts.ids.dtype)], 1)
        attention = torch.cat([contexts.mask, response.mask.to(contexts.mask.dtype)], 1)
        with _eval(self.model):
            rows = response_rows(last_hidden(self.model, ids, attention), contexts.ids.shape[1], mask)
        head = output_head(self.model)
        targets = response.ids[mask]
        out = torch.zeros(mask.shape, dtype=torch.float32, device=ids.device)
        if targets.numel():
            out[mask] = torch.cat(
                [
                    token_logprobs(head(rows[i : i + chunk_size]), targets[i : i + chunk_size])
                    for i in range(0, rows.shape[0], chunk_size)
                ]
            )
        return out

    def _run(self, prompts: Prompts, sampling: SamplingConfig, seeds: list[int]) -> Rollouts:
        u = None if sampling.greedy else uniforms(seeds, sampling.max_new_tokens, prompts.ids.device)
        run = _native if self.options.decoder == "native" else self._hf_generate
        tokens, logprobs = run(self.model, prompts, sampling, u, self.eos_ids, self.synced)
        ids, mask, truncated = cut_at_eos(tokens, self.eos_ids, self.pad_id)
        return Rollouts(ids, mask, truncated, logprobs.masked_fill(~mask, 0.0))

    def _hf_generate(self, model, prompts: Prompts, sampling: SamplingConfig, u, eos_ids, synced):
        drawer = _Drawer(sampling, u)
        kwargs = {"do_sample": False, "max_new_tokens": sampling.max_new_tokens}
        if self.options.cache == "static":
            kwargs["cache_implementation"] = "static"
            if self.options.compile:
                config = CompileConfig()
                # generate compiles only on accelerators unless this flag is set (transformers' switch for CPU): an
                # explicit request to compile should hold wherever the model runs.
                config._compile_all_devices = True
                kwargs["compile_config"] = config
            else:
                # On CUDA generate would compile a static-cache model on its own; compiling is the caller's choice.
                kwargs["disable_compile"] = True
        out = model.generate(
            input_ids=prompts.ids,
            attention_mask=prompts.mask,
            eos_token_id=eos_ids,
            pad_token_id=self.pad_id,
            return_dict_in_generate=True,
            synced_gpus=synced,
            logits_processor=LogitsProcessorList([drawer]),
            **kwargs,
        )
        tokens = out.sequences[:, prompts.ids.shape[1] :]
        return tokens, torch.stack(drawer.logprobs[: tokens.shape[1]], 1)


class _Drawer(LogitsProcessor):
    """Draws each next token itself (``sampling.draw``) and leaves ``generate``, run greedy, one finite logit."""

    def __init__(self, sampling: SamplingConfig, u: torch.Tensor | None) -> None:
        self.sampling, self.u, self.logprobs = sampling, u, []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        u = None if self.u is None else self.u[:, len(self.logprobs)]
        token, logprob = draw(filtered_logprobs(scores, self.sampling), u)
        self.logprobs.append(logprob)
        return torch.full_like(scores, float("-inf")).scatter_(-1, token[:, None], 0.0)


def _native(model, prompts: Prompts, sampling: SamplingConfig, u, eos_ids: list[int], synced: bool):
    """Prefill, then one forward per token on a dynamic cache; finished rows get their end token repeated (cut later).

    Honours the model's ``generation_config.min_new_tokens``.
    """
    from transformers import DynamicCache

    batch, device = prompts.ids.shape[0], prompts.ids.device
    mask = prompts.mask.long()
    position = position_ids(mask)
    cache = DynamicCache(config=model.config)
    cache_kwarg = _cache_kwarg(model)
    out = model(
        input_ids=prompts.ids,
        attention_mask=mask,
        position_ids=position,
        use_cache=True,
        logits_to_keep=1,
        **{cache_kwarg: cache},
    )
    position = position[:, -1:]
    eos = torch.tensor(eos_ids, device=device)
    min_new = getattr(model.generation_config, "min_new_tokens", None) or 0
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens, logprobs = [], []
    for step in range(sampling.max_new_tokens):
        logits = out.logits[:, -1].float()
        if step < min_new:
            logits[:, eos] = float("-inf")
        token, logprob = draw(filtered_logprobs(logits, sampling), None if u is None else u[:, step])
        tokens.append(token.masked_fill(done, eos_ids[0]))
        logprobs.append(logprob)
        done |= torch.isin(token, eos)
        if step == sampling.max_new_tokens - 1 or _all_done(done, synced):
            break
        mask = torch.cat([mask, mask.new_ones(batch, 1)], 1)
        position = position + 1
        out = model(
            input_ids=tokens[-1][:, None],
            attention_mask=mask,
            position_ids=position,
            use_cache=True,
            **{cache_kwarg: cache},
        )
    return torch.stack(tokens, 1), torch.stack(logprobs, 1)


def _cache_kwarg(model: nn.Module) -> str:
    # transformers 5 renamed the forward's `past_key_values` to `cache` (the old name warns, then goes in 5.40); a
    # peft wrapper forwards **kwargs, so ask the model inside it.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _all_done(done: torch.Tensor, synced: bool) -> bool:
    if not synced:
        return bool(done.all())
    flag = done.all().float()
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag)


def _agreed_max(value: int, device) -> int:
    count = torch.tensor(float(value), device=device)
    torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
    return int(count)


@contextlib.contextmanager
def _eval(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
