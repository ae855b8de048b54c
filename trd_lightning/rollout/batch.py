"""The typed data of one step: the prompts the DataLoader yields, the rollouts, and the batch the loss reads.

Every prompt matrix is left-padded and every response matrix right-padded, so in ``prompt + response`` the response
always starts at column ``prompt width``: response token ``j`` is predicted by the hidden state at column
``width - 1 + j`` on both sides, whatever the two contexts are.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor


@dataclass
class Prompts:
    """Left-padded token rows: ``ids`` [B, P] and ``mask`` [B, P] (1 on real tokens)."""

    ids: Tensor
    mask: Tensor

    @classmethod
    def from_lists(cls, rows: list[list[int]], pad_id: int, device=None) -> Prompts:
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
                mask[i, width - len(r) :] = 1
        return cls(ids.to(device), mask.to(device))

    def lists(self) -> list[list[int]]:
        return [row[m.bool()].tolist() for row, m in zip(self.ids, self.mask)]

    def rows(self, index) -> Prompts:
        """The rows ``index`` (a slice, a list or a tensor of row numbers), left padding trimmed to the longest."""
        ids, mask = self.ids[index], self.mask[index]
        start = _leading_pad(mask)
        return Prompts(ids[:, start:], mask[:, start:])

    def repeat(self, times: int) -> Prompts:
        return Prompts(self.ids.repeat_interleave(times, 0), self.mask.repeat_interleave(times, 0))

    def __len__(self) -> int:
        return self.ids.shape[0]


@dataclass
class Rollouts:
    """Generated responses, right-padded.

    Attributes:
        ids: [B, L] response token ids, the end token included, pad after it.
        mask: [B, L] True on response tokens (the end token included).
        truncated: [B] True where no end token came within ``max_new_tokens``.
        logprobs: [B, L] log-probabilities of the drawn tokens under the distribution they were drawn from
            (temperature, top-k and top-p applied; the plain distribution for greedy decoding); 0 off the mask.
    """

    ids: Tensor
    mask: Tensor
    truncated: Tensor
    logprobs: Tensor

    def rows(self, index) -> Rollouts:
        return Rollouts(self.ids[index], self.mask[index], self.truncated[index], self.logprobs[index])

    def lists(self) -> list[list[int]]:
        return [row[m].tolist() for row, m in zip(self.ids, self.mask)]

    @classmethod
    def from_texts(cls, texts: list[str], tokenizer, max_new_tokens: int, eos_id: int, device=None) -> Rollouts:
        """Written responses as rollouts: tokenized, ended with ``eos_id``, cut at ``max_new_tokens`` (log-probs 0:
        nothing drew them)."""
        lists = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos_id] for t in texts]
        truncated = torch.tensor([len(x) > max_new_tokens for x in lists], dtype=torch.bool)
        lists = [x[:max_new_tokens] for x in lists]
        width = max((len(x) for x in lists), default=0)
        ids = torch.full((len(lists), width), tokenizer.pad_token_id, dtype=torch.long)
        for i, x in enumerate(lists):
            ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask = torch.arange(width)[None, :] < torch.tensor([len(x) for x in lists], dtype=torch.long)[:, None]
        return cls(ids.to(device), mask.to(device), truncated.to(device), torch.zeros(ids.shape, device=device))

    def replace_rows(self, rows: list[int], new: Rollouts, pad_id: int) -> Rollouts:
        """These rollouts with ``rows`` replaced by the rows of ``new``, right-padded to a common width."""
        width = max(self.ids.shape[1], new.ids.shape[1])
        index = torch.tensor(rows, dtype=torch.long, device=self.ids.device)

        def put(base: Tensor, other: Tensor, value) -> Tensor:
            out = pad_right(base, width, value).clone()
            out[index] = pad_right(other, width, value).to(out.dtype)
            return out

        truncated = self.truncated.clone()
        truncated[index] = new.truncated
        return Rollouts(
            put(self.ids, new.ids, pad_id),
            put(self.mask, new.mask, False),
            truncated,
            put(self.logprobs, new.logprobs, 0.0),
        )

    @classmethod
    def cat(cls, parts: list[Rollouts], pad_id: int) -> Rollouts:
        """Rows of several rollouts in order, right-padded to the longest."""
        width = max(p.ids.shape[1] for p in parts)
        return cls(
            torch.cat([pad_right(p.ids, width, pad_id) for p in parts]),
            torch.cat([pad_right(p.mask, width, False) for p in parts]),
            torch.cat([p.truncated for p in parts]),
            torch.cat([pad_right(p.logprobs, width, 0.0) for p in parts]),
        )

    def __len__(self) -> int:
        return self.ids.shape[0]


@dataclass
class Sequences:
    """Rows to distil on: student ids = prompt + response, teacher ids = context + response, the same response ids.

    ``behavior_logprobs`` are the log-probs of the response tokens under the policy that sampled them, on the rows
    where ``sampled`` is True (the student's own rollouts); a rewrite or a written response was drawn by no policy of
    the student's, and a loss that needs an importance ratio takes it as one there.
    """

    student_ids: Tensor
    student_mask: Tensor
    teacher_ids: Tensor
    teacher_mask: Tensor
    response_ids: Tensor
    response_mask: Tensor
    behavior_logprobs: Tensor
    sampled: Tensor

    @classmethod
    def build(cls, prompts: Prompts, contexts: Prompts, response: Rollouts, sampled: Tensor) -> Sequences:
        """Student and teacher sequences around ``response``; ``sampled`` [B] marks rows the student drew."""
        student_ids = torch.cat([prompts.ids, response.ids.to(prompts.ids.dtype)], 1)
        teacher_ids = torch.cat([contexts.ids, response.ids.to(contexts.ids.dtype)], 1)
        width = response.ids.shape[1]
        if not torch.equal(
            student_ids[:, student_ids.shape[1] - width :], teacher_ids[:, teacher_ids.shape[1] - width :]
        ):
            raise RuntimeError("The student and teacher sequences must end in identical response ids.")
        return cls(
            student_ids=student_ids,
            student_mask=torch.cat([prompts.mask, response.mask.to(prompts.mask.dtype)], 1),
            teacher_ids=teacher_ids,
            teacher_mask=torch.cat([contexts.mask, response.mask.to(contexts.mask.dtype)], 1),
            response_ids=response.ids,
            response_mask=response.mask,
            behavior_logprobs=response.logprobs,
            sampled=sampled,
        )

    def rows(self, index) -> Sequences:
        """The rows ``index``, with the columns that are padding in all of them trimmed off (left of the contexts,
        right of the responses): the same token losses, fewer padded positions in the forward passes."""
        out = replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)})
        mask = out.response_mask
        keep = int(mask.any(0).nonzero().max()) + 1 if mask.any() else 0
        width = self.response_mask.shape[1]
        student_left = _leading_pad(out.student_mask[:, : out.student_mask.shape[1] - width])
        teacher_left = _leading_pad(out.teacher_mask[:, : out.teacher_mask.shape[1] - width])
        cut = width - keep
        return replace(
            out,
            student_ids=out.student_ids[:, student_left : out.student_ids.shape[1] - cut],
            student_mask=out.student_mask[:, student_left : out.student_mask.shape[1] - cut],
            teacher_ids=out.teacher_ids[:, teacher_left : out.teacher_ids.shape[1] - cut],
            teacher_mask=out.teacher_mask[:, teacher_left : out.teacher_mask.shape[1] - cut],
            response_ids=out.response_ids[:, :keep],
            response_mask=mask[:, :keep],
            behavior_logprobs=out.behavior_logprobs[:, :keep],
        )

    def token_behavior_logprobs(self, student_logprobs: Tensor) -> Tensor:
        """Per response token (in ``response_mask`` order): the behaviour log-prob where the row was sampled by the
        student, else ``student_logprobs`` detached (an importance ratio of one)."""
        sampled = self.sampled[:, None].expand_as(self.response_mask)[self.response_mask.bool()]
        return torch.where(sampled, self.behavior_logprobs[self.response_mask.bool()], student_logprobs.detach())

    @property
    def prompt_width(self) -> int:
        return self.student_ids.shape[1] - self.response_ids.shape[1]

    @property
    def context_width(self) -> int:
        return self.teacher_ids.shape[1] - self.response_ids.shape[1]

    def __len__(self) -> int:
        return self.response_ids.shape[0]


@dataclass
class DistillBatch:
    """What one step distils on, produced from a ``PromptBatch`` by the DataModule.

    Attributes:
        train: the sequences the loss runs on: ``y_r`` where a rollout was refined, ``y_o`` elsewhere.
        original: ``y_o`` in its usual teacher context, when refinement is on (for diagnostics comparing y_o, y_r).
        refined: [B] True where the row of ``train`` is a rewrite.
        rollout_text: ``y_o`` decoded, one per rollout (rollouts of prompt i are rows i*n .. i*n + n - 1).
        refined_text: ``y_r`` decoded where the row was refined, else None.
        num_generations: rollouts per prompt.
        stats: the step's rollout statistics (``rollout/``, ``refine/``, ``perf/``).
        weight_version: [B] the student's weights each rollout was sampled from, in optimizer steps (-1: a written
            rollout); behind the current step by ``data.rollout.max_staleness`` at most.
    """

    train: Sequences
    original: Sequences | None
    refined: Tensor
    rollout_text: list[str]
    refined_text: list[str | None]
    num_generations: int
    stats: dict[str, float] = field(default_factory=dict)
    weight_version: Tensor | None = None


@dataclass
class PromptBatch:
    """One step's prompts, as the DataLoader yields them; ``produced`` holds the step's batch once it is made.

    Attributes:
        prompts: the student prompts (left-padded).
        contexts: the teacher contexts: the student prompt (OPD) or the privileged prompt (OPSD).
        index: [P] the rows' positions in their dataset (they key the per-row seeds).
        problem, solution, answer: the rows' text fields (None where absent).
        y_o, y_r: the written rollout and rewrite of an offline round, else None.
        produced: the step's ``DistillBatch`` (filled in ``on_train_batch_start``).
    """

    prompts: Prompts
    contexts: Prompts
    index: Tensor
    problem: list[str]
    solution: list[str | None]
    answer: list[str | None]
    y_o: list[str] | None = None
    y_r: list[str] | None = None
    produced: DistillBatch | None = None

    def __len__(self) -> int:
        return len(self.problem)

    def to(self, device) -> PromptBatch:
        """The prompt tensors on ``device`` (what Lightning's batch transfer does in a Trainer)."""
        move = {"prompts": Prompts(self.prompts.ids.to(device), self.prompts.mask.to(device))}
        move["contexts"] = Prompts(self.contexts.ids.to(device), self.contexts.mask.to(device))
        return replace(self, index=self.index.to(device), **move)

    def repeat(self, times: int) -> PromptBatch:
        """One row per rollout: each prompt's row repeated ``times`` times, in order."""

        def each(values):
            return None if values is None else [v for v in values for _ in range(times)]

        return PromptBatch(
            prompts=self.prompts.repeat(times),
            contexts=self.contexts.repeat(times),
            index=self.index.repeat_interleave(times),
            problem=each(self.problem),
            solution=each(self.solution),
            answer=each(self.answer),
            y_o=each(self.y_o),
            y_r=each(self.y_r),
        )


@dataclass(frozen=True)
class RolloutModels:
    """The narrow view of the module's models that the rollout side gets.

    Attributes:
        student: the student at its current weights: it samples ``y_o`` and scores rewrites for the support guard.
        scorer: opens the model that scores as teacher (a context manager: a LoRA student's adapter is switched off
            inside it for an initial-weights self-teacher).
        refiner: opens the frozen model that rewrites rollouts (TRD).
    """

    student: torch.nn.Module
    scorer: Callable[[], AbstractContextManager[torch.nn.Module]]
    refiner: Callable[[], AbstractContextManager[torch.nn.Module]]


@dataclass
class ValidationRollouts:
    """One validation batch's answers: ``texts`` (k per prompt, in order), ``correct`` [P, k] (None without a
    verifier or answers) and ``lengths`` [P * k] in tokens."""

    texts: list[str]
    correct: Tensor | None
    lengths: Tensor


@dataclass(frozen=True)
class RolloutSpec:
    """What the DataModule will produce, for the module to check its own settings against before weights load.

    Attributes:
        rollouts_per_step: rows of a step on one process (prompts x generations).
        teacher_context: ``prompt`` (OPD) or ``privileged`` (OPSD).
        longest_prompt: the longest prompt (student or teacher) in tokens.
        max_new_tokens: the longest rollout.
        refine_tokens: the refine prompt's budget plus the longest rewrite; None without refinement.
        validation_samples: k, the answers sampled per validation prompt.
        verifies: whether rollouts are checked (a verifier and an answer column).
        refines: whether refinement is on.
    """

    rollouts_per_step: int
    teacher_context: str
    longest_prompt: int
    max_new_tokens: int
    refine_tokens: int | None
    validation_samples: int
    verifies: bool
    refines: bool

    @property
    def longest_row(self) -> int:
        """The longest teacher row: a context and a rollout, or a refine prompt and its rewrite."""
        return max(self.longest_prompt + self.max_new_tokens, self.refine_tokens or 0)


@dataclass(frozen=True)
class StepInfo:
    """Where in training a batch is produced: the optimizer step and the process layout."""

    step: int
    rank: int = 0
    world_size: int = 1


def pad_right(t: Tensor, width: int, value) -> Tensor:
    """Right-pad the last dimension of ``t`` to ``width`` with ``value``."""
    if t.shape[-1] >= width:
        return t
    return torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=value)


def _leading_pad(mask: Tensor) -> int:
    """How many leading columns are padding in every row of a left-padded mask."""
    if mask.numel() == 0:
        return 0
    return int((mask.sum(0) == 0).long().cumprod(0).sum())


def response_rows(hidden: Tensor, prompt_width: int, response_mask: Tensor) -> Tensor:
    """The hidden states that predict the response tokens, one row per response token, in batch order.

    Args:
        hidden: [B, P + L, H] hidden states of ``prompt + response`` sequences.
        prompt_width: P, the (left-padded) prompt width.
        response_mask: [B, L] True on response tokens.
    """
    length = response_mask.shape[1]
    return hidden[:, prompt_width - 1 : prompt_width - 1 + length][response_mask.bool()]
