"""``ServedEngine``: the generation protocol (``rollout.engines.Generator``) over a served model.

One request per row, each with the row's seed (a completions request has one seed), sent concurrently: the server
batches them. Served by ``trd serve``, a row's tokens are those in-process generation draws for the same seed;
stock vLLM matches it only for greedy decoding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from trd_lightning.hf import load_config
from trd_lightning.rollout.batch import Prompts, Rollouts
from trd_lightning.rollout.sampling import SamplingConfig
from trd_lightning.serve.client import NEUTRAL_SAMPLING, ServiceClient, generated_logprobs, prompt_scores, token_ids
from trd_lightning.serve.options import ServiceError, ServiceOptions


class ServedEngine:
    """Generation and scoring by the service at ``url``.

    Args:
        url: the service's address.
        options: timeout, retries, backoff and concurrency.
        pad_id: the token written after a response's end.
        vocab_size: the student's vocabulary; every id the service returns must fall inside it.
        option: the config option that set the address, for error messages.
    """

    def __init__(
        self, url: str, options: ServiceOptions, pad_id: int, vocab_size: int, option: str = "data.refine.url"
    ) -> None:
        self.client = ServiceClient(url, options, option)
        self.pad_id, self.vocab_size = pad_id, vocab_size

    def check(self, tokenizer, needed: int | None = None) -> None:
        """The start checks (``ServiceClient.check``; ``needed``: the run's longest request in positions), then the
        probe's reply read as a rewrite is read."""
        sampling = SamplingConfig(max_new_tokens=1, temperature=0.0)
        _, reply = self.client.check(tokenizer, self.vocab_size, self._body([[0]], sampling, 0), needed)
        self._read(reply["choices"][0], 1)

    def generate(self, prompts: Prompts, sampling: SamplingConfig, seeds: Sequence[int]) -> Rollouts:
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: one seed per row.")
        device = prompts.ids.device
        if not len(prompts):
            empty = prompts.ids.new_zeros((0, 0))
            return Rollouts(empty, empty.bool(), empty.new_zeros(0).bool(), empty.float())
        lists = prompts.lists()
        # A request has one seed: sampled rows go one per request, greedy ones (no seed to tell) share requests.
        size = self.client.options.rows_per_request if sampling.greedy else 1
        bodies = [self._body(lists[i : i + size], sampling, seeds[i]) for i in range(0, len(lists), size)]
        rows = [row for part in self.client.map(self._generate_rows, bodies) for row in part]
        width = max(len(ids) for ids, _, _ in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        logprobs = torch.zeros((len(rows), width), dtype=torch.float32)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (row, lps, _) in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            logprobs[i, : len(row)] = torch.tensor(lps)
            mask[i, : len(row)] = True
        truncated = torch.tensor([t for _, _, t in rows], dtype=torch.bool)
        return Rollouts(ids.to(device), mask.to(device), truncated.to(device), logprobs.to(device))

    def logprobs(self, contexts: Prompts, response: Rollouts) -> torch.Tensor:
        mask = response.mask.bool()
        out = torch.zeros(mask.shape, dtype=torch.float32)
        rows = [c + r for c, r in zip(contexts.lists(), response.lists())]
        tails = mask.sum(-1).tolist()

        def score(i: int) -> list[float]:
            if not tails[i]:
                return []
            body = {"prompt": rows[i], "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 1}
            choice = self.client.complete(body)["choices"][0]
            return prompt_scores(self.client, choice, rows[i], tails[i], 1, self.vocab_size)[2]

        for i, values in enumerate(self.client.map(score, list(range(len(rows))))):
            out[i, : len(values)] = torch.tensor(values)
        return out.to(mask.device)

    def _body(self, rows: list[list[int]], sampling: SamplingConfig, seed: int) -> dict:
        return {
            "prompt": rows,
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k or -1,  # -1 turns top-k off in every vLLM version
            "seed": int(seed),
            "n": 1,
            "logprobs": 0,
            "return_token_ids": True,
            **NEUTRAL_SAMPLING,
        }

    def _generate_rows(self, body: dict) -> list[tuple[list[int], list[float], bool]]:
        # vLLM ends a request it had to drop (preempted, engine restarting) with finish_reason "abort": ask again.
        for _ in range(self.client.options.retries + 1):
            choices = self.client.complete(body)["choices"]
            if all(c.get("finish_reason") != "abort" for c in choices):
                return [self._read(choice, body["max_tokens"]) for choice in choices]
        raise ServiceError(
            self.client.url,
            f"The service at {self.client.url} ({self.client.option}) aborted a request "
            f"{self.client.options.retries + 1} times: check its log (out of KV-cache memory, or restarting).",
        )

    def _read(self, choice: dict, max_tokens: int) -> tuple[list[int], list[float], bool]:
        """(ids, their log-probs, truncated) of one choice; a response stops at an end token or at ``max_tokens``."""
        ids = token_ids(self.client, choice, max_tokens, self.vocab_size)
        reason = choice.get("finish_reason")
        if reason not in ("stop", "length"):
            raise self.client.malformed(f"finish_reason {reason!r} (expected 'stop' or 'length')")
        return ids, generated_logprobs(self.client, choice, len(ids)), reason == "length"


def connect(url: str, options: ServiceOptions, tokenizer, student: str, needed: int, option: str) -> ServedEngine:
    """A served generator of a run (the refiner, or the student's rollouts), checked against the student's tokenizer
    and vocabulary, and against the run's longest request, before any weights load.

    Args:
        url: the service's address.
        options: its timeout, retries, backoff and concurrency.
        tokenizer: the student's tokenizer.
        student: the student's (or its tokenizer's) name or path: its config gives the vocabulary, else the
            tokenizer does.
        needed: the run's longest request to it: prompt budget plus new tokens.
        option: the config option that set the address (``data.refine.url``, ``data.rollout.url``).
    """
    try:
        vocab = load_config(student).vocab_size
    except (OSError, ValueError):  # a tokenizer folder without a model config
        vocab = len(tokenizer)
    engine = ServedEngine(url, options, tokenizer.pad_token_id, vocab, option)
    engine.check(tokenizer, needed)
    return engine
