"""Sampling from and scoring the demo models through the library's own rollout pieces, for the build and its
measurements: the native decoder with per-row seeds (``rollout.engines``), and responses scored after a context as
the trainer scores them (left-padded context, right-padded response)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trd_lightning.hf import last_hidden, output_head
from trd_lightning.rollout.batch import Prompts, response_rows
from trd_lightning.rollout.engines import EngineOptions, LocalEngine, end_token_ids
from trd_lightning.rollout.sampling import SamplingConfig
from trd_lightning.rollout.seeds import row_seeds


@dataclass
class Samples:
    """Responses of one call: token ids (the end token included), decoded texts, and truncated flags."""

    ids: list[list[int]]
    texts: list[str]
    truncated: list[bool]


@torch.no_grad()
def sample(
    model, tokenizer, contexts: list[list[int]], temperature: float, max_new_tokens: int, seed: int, purpose: str
) -> Samples:
    """One response of ``model`` after each context (greedy at temperature 0).

    Row ``i`` draws with the seed ``row_seeds(seed, 0, purpose, [i])``, so the responses do not depend on how the
    rows are chunked.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer (pad and end tokens).
        contexts: prompt token ids, one list per row.
        temperature: 0 for greedy decoding.
        max_new_tokens: the longest response.
        seed: the seed the rows' seeds derive from.
        purpose: names the draw, so two draws from one seed differ.
    """
    engine = LocalEngine(model, end_token_ids(model, tokenizer), tokenizer.pad_token_id, EngineOptions(max_rows=256))
    rows = Prompts.from_lists(contexts, tokenizer.pad_token_id)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature)
    out = engine.generate(rows, sampling, row_seeds(seed, 0, purpose, range(len(contexts))))
    ids = out.lists()
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in ids]
    return Samples(ids, texts, out.truncated.tolist())


@torch.no_grad()
def response_logits(model, tokenizer, contexts: list[list[int]], responses: list[list[int]]) -> list[torch.Tensor]:
    """Per response, the [len, V] float32 logits ``model`` gives each of its tokens after its context."""
    c = Prompts.from_lists(contexts, tokenizer.pad_token_id)
    width = max(len(x) for x in responses)
    r_ids = torch.full((len(responses), width), tokenizer.pad_token_id)
    r_mask = torch.zeros((len(responses), width), dtype=torch.bool)
    for i, x in enumerate(responses):
        r_ids[i, : len(x)] = torch.tensor(x)
        r_mask[i, : len(x)] = True
    ids = torch.cat([c.ids, r_ids], 1)
    mask = torch.cat([c.mask, r_mask.long()], 1)
    was_training = model.training
    model.eval()
    rows = output_head(model)(response_rows(last_hidden(model, ids, mask), c.ids.shape[1], r_mask)).float()
    model.train(was_training)
    return list(rows.split([len(x) for x in responses]))
