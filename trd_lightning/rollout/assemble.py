"""The last stage: the step's ``DistillBatch``, with identical response ids on the student and the teacher side."""

from __future__ import annotations

from typing import Literal

import torch

from trd_lightning.rollout.batch import DistillBatch, PromptBatch, Prompts, Rollouts, Sequences
from trd_lightning.rollout.rewrite import Rewrites


def assemble(
    rows: PromptBatch,
    y_o: Rollouts,
    sampled: bool,
    texts: list[str],
    rewrites: Rewrites | None,
    scored_after: Literal["refine", "original"],
    pad_id: int,
    num_generations: int,
    stats: dict[str, float],
) -> DistillBatch:
    """The batch the loss reads.

    Args:
        rows: one row per rollout (prompts repeated), with the student prompts and the usual teacher contexts.
        y_o: the rollouts; ``sampled``: whether the student drew them.
        texts: ``y_o`` decoded.
        rewrites: the step's rewrites, or None without refinement.
        scored_after: the teacher context of a rewrite: its refine prompt (``refine``) or the rollout's usual
            context (``original``).
        pad_id: the pad token.
        num_generations: rollouts per prompt.
        stats: the step's statistics.
    """
    device = y_o.ids.device
    as_sampled = torch.full((len(y_o),), sampled, dtype=torch.bool, device=device)
    original = Sequences.build(rows.prompts, rows.contexts, y_o, as_sampled)
    refined = torch.zeros(len(y_o), dtype=torch.bool, device=device)
    if rewrites is None:
        return DistillBatch(original, None, refined, texts, [None] * len(texts), num_generations, stats)
    kept = [j for j, keep in enumerate(rewrites.kept) if keep]
    rows_kept = [rewrites.rows[j] for j in kept]
    refined[rows_kept] = True
    refined_text: list[str | None] = [None] * len(texts)
    for j, row in zip(kept, rows_kept):
        refined_text[row] = rewrites.texts[j]
    contexts = rows.contexts
    if rows_kept and scored_after == "refine":
        lists = rows.contexts.lists()
        for j, row in zip(kept, rows_kept):
            lists[row] = rewrites.refine_prompts[j]
        contexts = Prompts.from_lists(lists, pad_id, device)
    response = y_o.replace_rows(rows_kept, rewrites.response.rows(kept), pad_id) if rows_kept else y_o
    train = Sequences.build(rows.prompts, contexts, response, as_sampled & ~refined)
    return DistillBatch(train, original, refined, texts, refined_text, num_generations, stats)
