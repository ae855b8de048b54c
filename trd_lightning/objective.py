"""The distillation objective of one step: micro-batches, the two models' forward passes, and per-token losses.

The module orchestrates the step; this file says what is computed on a ``Sequences`` batch: the student's hidden
states (with grad) and the scoring model's (without), the divergence chunk by chunk from those hidden states (so
neither model's full logits are ever held), and the token-level options (loss truncation, TOPD weighting).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from trd_lightning import losses
from trd_lightning.diagnostics import token_distribution_stats
from trd_lightning.hf import last_hidden, output_head
from trd_lightning.rollout.batch import Sequences, response_rows

if TYPE_CHECKING:
    from trd_lightning.serve.teacher import TeacherScores


@dataclass(frozen=True)
class Objective:
    """The per-token loss: the divergence (``spec``) and the token-level options applied after it (see
    ``DistillationModule`` for each option's meaning)."""

    spec: losses.LossSpec = losses.LossSpec()
    token_clip: float | None = None
    topd: bool = False
    topd_threshold: float = 1.0
    topd_window: int = 4
    topd_discount: float = 0.9

    def token_losses(
        self, student: nn.Module, scorer: Scorer, seqs: Sequences, served: TeacherScores | None = None
    ) -> Tensor:
        """Per-response-token losses of ``seqs`` (in ``response_mask`` order), the student's graph attached; against
        a served teacher's top-k scores of ``seqs`` where ``served`` is given (``scorer`` is then not opened)."""
        if served is not None:
            return self.served_token_losses(student, seqs, served)
        student_rows, teacher_rows, teacher_head = self.response_hidden(student, scorer, seqs)
        aux = {}
        if self.spec.kind == "sampled_token":
            mask = seqs.response_mask.bool()
            aux = {
                "token_ids": seqs.response_ids[mask],
                "behavior_logprobs": seqs.behavior_logprobs[mask],
                "sampled": seqs.sampled[:, None].expand_as(mask)[mask],
            }
        student_head = output_head(student)
        per_token = losses.token_losses(student_rows, teacher_rows, student_head, teacher_head, self.spec, **aux)
        return self._token_options(per_token, seqs)

    def served_token_losses(self, student: nn.Module, seqs: Sequences, scores: TeacherScores) -> Tensor:
        """Per-response-token losses of ``seqs`` against a served teacher's top-k ``scores`` (aligned with the
        response): ``topk`` on the teacher's support, or ``sampled_token`` from the token's own log-prob."""
        mask = seqs.response_mask.bool()
        rows, head = self._student_rows(student, seqs), output_head(student)
        ids, top_logprobs, token_logprobs = scores.flat(mask)
        chunk = self._chunk_rows(head, rows)
        if self.spec.kind == "sampled_token":
            student_lp = losses.chunked_token_loss(
                rows, token_logprobs[:, None], head, _identity, _student_token, chunk, seqs.response_ids[mask]
            )
            behavior = seqs.token_behavior_logprobs(student_lp)
            per_token = losses.sampled_token_loss(student_lp, token_logprobs, behavior, self.spec.ratio_clip)
        else:
            divergence = partial(losses.served_topk_divergence, beta=self.spec.beta, tail=self.spec.top_k_tail)
            per_token = losses.chunked_token_loss(rows, top_logprobs, head, _identity, divergence, chunk, ids)
        return self._token_options(per_token, seqs)

    def _student_rows(self, student: nn.Module, seqs: Sequences) -> Tensor:
        hidden = last_hidden(student, seqs.student_ids, seqs.student_mask)
        return response_rows(hidden, seqs.prompt_width, seqs.response_mask)

    def _chunk_rows(self, head, hidden: Tensor) -> int:
        return losses.chunk_rows(self.spec, losses.vocab_size(head, hidden))

    def _token_options(self, per_token: Tensor, seqs: Sequences) -> Tensor:
        """Loss truncation and TOPD weighting, after the divergence."""
        if self.token_clip is not None:
            per_token = losses.kl_token_clip(per_token, self.token_clip)
        if self.topd:
            # TOPD looks along each sequence: lay the rows back out as [batch, position] and return to rows.
            mask = seqs.response_mask
            weighted = losses.topd_token_loss(
                grid(per_token, mask), mask, self.topd_threshold, self.topd_window, self.topd_discount
            )
            per_token = weighted[mask.bool()]
        return per_token

    def token_statistics(
        self, student: nn.Module, scorer: Scorer, seqs: Sequences, served: TeacherScores | None = None
    ) -> Tensor:
        """[n, 5] per-token statistics (``diagnostics.STAT_COLUMNS``) of the teacher against the student (from
        ``served`` scores where given: ``losses.served_token_statistics``)."""
        if served is not None:
            ids, top_logprobs, token_logprobs = served.flat(seqs.response_mask)
            rows, head = self._student_rows(student, seqs), output_head(student)
            stats = losses.served_token_statistics
            return losses.chunked_token_loss(
                rows, top_logprobs, head, _identity, stats, self._chunk_rows(head, rows), ids, token_logprobs
            )
        student_rows, teacher_rows, teacher_head = self.response_hidden(student, scorer, seqs)
        token_ids = seqs.response_ids[seqs.response_mask.bool()]
        return losses.chunked_token_loss(
            student_rows,
            teacher_rows,
            output_head(student),
            teacher_head,
            token_distribution_stats,
            self._chunk_rows(output_head(student), student_rows),
            token_ids,
        )

    def response_hidden(self, student: nn.Module, scorer: Scorer, seqs: Sequences):
        """Student and teacher hidden states at the response positions of ``seqs``, and the teacher's head."""
        mask = seqs.response_mask
        student_rows = self._student_rows(student, seqs)
        with torch.no_grad(), scorer() as model:
            teacher_rows = response_rows(
                last_hidden(model, seqs.teacher_ids, seqs.teacher_mask), seqs.context_width, mask
            )
            teacher_head = output_head(model)
        return student_rows, teacher_rows, teacher_head


Scorer = Callable[[], AbstractContextManager[nn.Module]]


def micro_batches(seqs: Sequences, rows: int, tokens: int | None = None) -> list[list[int]]:
    """The step's micro-batches, as lists of row numbers.

    With ``tokens`` None: consecutive groups of ``rows`` rows. With a token budget: rows sorted by length and packed
    greedily so that each micro-batch's forward passes (the student's and the teacher's: rows x (longest context +
    longest response), padding included) hold at most ``tokens`` positions each; a row over the budget on its own forms
    a micro-batch. The step's gradient is the same either way (the loss is normalised by the step's token count).
    """
    n = len(seqs)
    if tokens is None:
        return [list(range(i, min(i + rows, n))) for i in range(0, n, rows)]
    response = seqs.response_mask.sum(-1).tolist()
    student = (seqs.student_mask.sum(-1) - seqs.response_mask.sum(-1)).tolist()
    teacher = (seqs.teacher_mask.sum(-1) - seqs.response_mask.sum(-1)).tolist()
    order = sorted(range(n), key=lambda i: (student[i] + response[i], teacher[i] + response[i]), reverse=True)
    groups: list[list[int]] = []
    longest = (0, 0, 0)
    for i in order:
        grown = (max(longest[0], student[i]), max(longest[1], teacher[i]), max(longest[2], response[i]))
        if groups and (len(groups[-1]) + 1) * (max(grown[0], grown[1]) + grown[2]) <= tokens:
            groups[-1].append(i)
            longest = grown
        else:
            groups.append([i])
            longest = (student[i], teacher[i], response[i])
    return [sorted(g) for g in groups]


def grid(per_token: Tensor, mask: Tensor) -> Tensor:
    """Per-token values laid out as the [B, L] response grid (0 off the mask)."""
    return per_token.new_zeros(mask.shape).masked_scatter(mask.bool(), per_token)


def _identity(x: Tensor) -> Tensor:
    """The "head" of served scores: they arrive as log-probs already."""
    return x


def _student_token(student_logits: Tensor, teacher_scores: Tensor, ids: Tensor) -> Tensor:
    return losses.token_logprobs(student_logits, ids)
