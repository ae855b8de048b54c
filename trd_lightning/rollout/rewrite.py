"""TRD's rewrite stage: the refiner rewrites chosen rollouts ``y_o`` into ``y_r`` from a refine prompt.

Two implementations of one interface: ``ModelRewriter`` asks a generation engine (the refiner in-process, or a served
one) for each rewrite; ``WrittenRewriter`` reads the rewrites of a round written by ``trd refine``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from trd_lightning import prompts as templates
from trd_lightning.rollout.batch import PromptBatch, Prompts, Rollouts
from trd_lightning.rollout.engines import Generator
from trd_lightning.rollout.sampling import SamplingConfig


@dataclass
class Rewrites:
    """The rewrites the step trains on, and what they were made from.

    Attributes:
        rows: the rollouts rewritten, in order.
        response: their rewrites ``y_r``, one row per entry of ``rows``.
        refine_prompts: their refine prompts (the teacher context under ``teacher_context: refine``).
        texts: ``y_r`` decoded.
        kept: per rewrite, whether the support guard kept it (the step trains on ``y_o`` where it did not).
        stats: ``refine/`` statistics of the step.
    """

    rows: list[int]
    response: Rollouts
    refine_prompts: list[list[int]]
    texts: list[str]
    kept: list[bool]
    stats: dict[str, float] = field(default_factory=dict)


class Rewriter(Protocol):
    def rewrite(
        self,
        rows: PromptBatch,
        y_o: Rollouts,
        texts: list[str],
        chosen: list[int],
        seeds: list[int],
        refiner: Generator | None,
        student: Generator | None,
        min_student_logprob: float | None,
    ) -> Rewrites:
        """Rewrite the rollouts ``chosen`` (indices into ``rows``, one row per rollout)."""


class RefinePrompt:
    """The refine prompt of a rollout: problem, [reference], the student's attempt, and instructions.

    Args:
        tokenizer: the student's tokenizer.
        template: the refine prompt, with ``{problem}``, ``{initial}`` and, for OPSD, ``{solution}``.
        max_prompt_length: its budget; the attempt's tail is cut first, then the reference's, never the problem.
        use_chat_template: wrap it as a user turn.
        chat_template_kwargs: extra ``apply_chat_template`` arguments for the refine prompt.
    """

    def __init__(
        self, tokenizer, template: str, max_prompt_length: int, use_chat_template: bool, chat_template_kwargs
    ) -> None:
        self.tokenizer, self.template, self.max_prompt_length = tokenizer, template, max_prompt_length
        self.use_chat_template, self.chat_template_kwargs = use_chat_template, chat_template_kwargs

    def ids(self, problem: str, solution: str | None, initial: str) -> list[int]:
        return templates.fit_prompt(
            self.template,
            {"problem": problem, "solution": solution or "", "initial": initial},
            self.tokenizer,
            self.max_prompt_length,
            ("initial", "solution"),
            self.use_chat_template,
            self.chat_template_kwargs,
        )


class ModelRewriter:
    """Rewrites with a generation engine; the student's log-probs of each rewrite feed the support guard.

    Args:
        prompt: builds the refine prompts.
        sampling: how the refiner samples ``y_r``.
        max_stat_rows: at most this many pairs per step enter the edit-distance statistic (it is quadratic).
    """

    def __init__(self, prompt: RefinePrompt, sampling: SamplingConfig, max_stat_rows: int = 16) -> None:
        self.prompt, self.sampling, self.max_stat_rows = prompt, sampling, max_stat_rows

    def rewrite(self, rows, y_o, texts, chosen, seeds, refiner, student, min_student_logprob) -> Rewrites:
        tokenizer, device = self.prompt.tokenizer, y_o.ids.device
        refine_prompts = [self.prompt.ids(rows.problem[i], rows.solution[i], texts[i]) for i in chosen]
        y_r = refiner.generate(
            Prompts.from_lists(refine_prompts, tokenizer.pad_token_id, device),
            self.sampling,
            [seeds[i] for i in chosen],
        )
        mean_lp = None  # no student to score with: an overlapped step, made while the student trains
        if student is not None:
            # Every process scores, with no rows or many: under sharding each forward is collective.
            student_lp = student.logprobs(rows.prompts.rows(chosen), y_r)
            mean_lp = student_lp.sum(-1) / y_r.mask.sum(-1).clamp(min=1)
        keep = [True] * len(chosen) if min_student_logprob is None else (mean_lp >= min_student_logprob).tolist()
        r_texts = tokenizer.batch_decode(y_r.ids, skip_special_tokens=True)
        stats = {"refine/selected": len(chosen) / len(rows.problem)}
        if chosen:
            stats.update(rewrite_stats(y_o.rows(chosen), y_r, mean_lp, self.max_stat_rows))
            stats["refine/guard_rejected"] = 1.0 - sum(keep) / len(keep)
        stats["refine/fraction"] = sum(keep) / len(rows.problem)
        return Rewrites(list(chosen), y_r, refine_prompts, r_texts, keep, stats)


class WrittenRewriter:
    """The rewrites of an offline round (``trd refine``): ``rows.y_r``, tokenized and ended like a generated one.

    Args:
        prompt: builds the refine prompts (the teacher context under ``teacher_context: refine``).
        max_new_tokens: responses are cut at this length.
        eos_id: the end token appended to each written response.
    """

    def __init__(self, prompt: RefinePrompt, max_new_tokens: int, eos_id: int) -> None:
        self.prompt, self.max_new_tokens, self.eos_id = prompt, max_new_tokens, eos_id

    def rewrite(self, rows, y_o, texts, chosen, seeds, refiner, student, min_student_logprob) -> Rewrites:
        written = [rows.y_r[i] for i in chosen]
        response = Rollouts.from_texts(written, self.prompt.tokenizer, self.max_new_tokens, self.eos_id, y_o.ids.device)
        refine_prompts = [self.prompt.ids(rows.problem[i], rows.solution[i], texts[i]) for i in chosen]
        stats = {"refine/selected": len(chosen) / len(rows.problem), "refine/fraction": len(chosen) / len(rows.problem)}
        return Rewrites(list(chosen), response, refine_prompts, written, [True] * len(chosen), stats)


def rewrite_stats(
    y_o: Rollouts, y_r: Rollouts, mean_student_logprob: torch.Tensor | None, max_rows: int
) -> dict[str, float]:
    """How far the rewrites moved the rollouts: length ratio, normalised token edit distance, the student's mean
    log-prob of ``y_r`` (how far it left the student's support; where it was scored) and the rewrites' truncated
    share."""
    len_o = y_o.mask.sum(-1).float().clamp(min=1)
    pairs = list(zip(y_o.lists(), y_r.lists()))[:max_rows]
    stats = {
        "refine/length_ratio": (y_r.mask.sum(-1).float() / len_o).mean().item(),
        "refine/truncated_frac": y_r.truncated.float().mean().item(),
        "refine/edit_distance": sum(token_edit_distance(a, b) for a, b in pairs) / len(pairs),
    }
    if mean_student_logprob is not None:
        stats["refine/student_logprob"] = mean_student_logprob.mean().item()
    return stats


def token_edit_distance(a: list[int], b: list[int]) -> float:
    """Levenshtein distance between two token sequences, divided by the longer length (0 when both are empty)."""
    if not a and not b:
        return 0.0
    if not a or not b:
        return 1.0
    x, y = np.asarray(a), np.asarray(b)
    prev = np.arange(len(y) + 1)
    for i in range(1, len(x) + 1):
        # One DP row at a time, vectorised: substitutions/deletions first, insertions by a running minimum.
        sub = prev[:-1] + (y != x[i - 1])
        row = np.empty_like(prev)
        row[0] = i
        row[1:] = np.minimum(sub, prev[1:] + 1)
        row = np.minimum.accumulate(row - np.arange(len(row))) + np.arange(len(row))
        prev = row
    return float(prev[-1]) / max(len(x), len(y))
