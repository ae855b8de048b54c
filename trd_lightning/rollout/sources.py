"""Where a step's rollouts ``y_o`` come from: the student's sampler, or a round written by ``trd refine``."""

from __future__ import annotations

from typing import Protocol

from trd_lightning.rollout.batch import PromptBatch, Rollouts
from trd_lightning.rollout.engines import Generator
from trd_lightning.rollout.sampling import SamplingConfig


class RolloutSource(Protocol):
    """One rollout per row of ``rows`` (rows are rollouts: prompts already repeated), row ``r`` seeded ``seeds[r]``,
    with its text.

    ``sampled`` says whether the student drew them (their log-probs are behaviour log-probs).
    """

    sampled: bool

    def rollouts(self, rows: PromptBatch, seeds: list[int], student: Generator) -> tuple[Rollouts, list[str]]: ...


class StudentRollouts:
    """On-policy rollouts: the student samples ``y_o`` with ``sampling``."""

    sampled = True

    def __init__(self, tokenizer, sampling: SamplingConfig) -> None:
        self.tokenizer, self.sampling = tokenizer, sampling

    def rollouts(self, rows: PromptBatch, seeds: list[int], student: Generator) -> tuple[Rollouts, list[str]]:
        out = student.generate(rows.prompts, self.sampling, seeds)
        return out, self.tokenizer.batch_decode(out.ids, skip_special_tokens=True)


class WrittenRollouts:
    """The rollouts of an offline round (``rows.y_o``), tokenized and ended like generated ones."""

    sampled = False

    def __init__(self, tokenizer, max_new_tokens: int, eos_id: int) -> None:
        self.tokenizer, self.max_new_tokens, self.eos_id = tokenizer, max_new_tokens, eos_id

    def rollouts(self, rows: PromptBatch, seeds: list[int], student: Generator) -> tuple[Rollouts, list[str]]:
        device = rows.prompts.ids.device
        return Rollouts.from_texts(rows.y_o, self.tokenizer, self.max_new_tokens, self.eos_id, device), list(rows.y_o)


def rollout_stats(out: Rollouts, correct: list[bool] | None, seconds: float) -> dict[str, float]:
    lengths = out.mask.sum(-1).float()
    stats = {
        "rollout/response_length": lengths.mean().item(),
        "rollout/response_length_max": lengths.max().item(),
        "rollout/truncated_frac": out.truncated.float().mean().item(),
        "perf/rollout_seconds": seconds,
        "perf/rollout_tokens_per_sec": lengths.sum().item() / max(seconds, 1e-9),
    }
    if correct is not None:
        stats["rollout/accuracy"] = sum(correct) / len(correct)
    return stats
