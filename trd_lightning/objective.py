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
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from trd_lightning import losses
from trd_lightning.diagnostics import token_distribution_stats
from trd_lightning.hf import last_hidden, output_head
from trd_lightning.rollout.batch import Sequences, response_rows

if TYPE_CHECKING:
    from trd_lightning.serve.teacher import TeacherScores

LossName = Literal["jsd", "topk", "sampled_token", "pointwise_clip"]
Implementation = Literal["auto", "checkpointed", "closed_form"]


@dataclass(frozen=True)
class Objective:
    """The per-token loss (see ``DistillationModule`` for each option's meaning)."""

    loss: LossName = "jsd"
    beta: float = 0.0
    temperature: float = 1.0
    top_k: int = 32
    top_k_tail: bool = True
    top_k_support: Literal["teacher", "student"] = "teacher"
    pointwise_clip: float = 0.05
    token_clip: float | None = None
    topd: bool = False
    topd_threshold: float = 1.0
    topd_window: int = 4
    topd_discount: float = 0.9
    chunk_size: int = 1024
    implementation: Implementation = "auto"

    def token_losses(
        self, student: nn.Module, scorer: Scorer, seqs: Sequences, served: TeacherScores | None = None
    ) -> Tensor:
        """Per-response-token losses of ``seqs`` (in ``response_mask`` order), the student's graph attached; against
        a served teacher's top-k scores of ``seqs`` where ``served`` is given (``scorer`` is then not opened)."""
        if served is not None:
            return self.served_token_losses(student, seqs, served)
        student_rows, teacher_rows, teacher_head = self.response_hidden(student, scorer, seqs)
        student_head = output_head(student)
        weights = self.closed_form_weights(student_head, teacher_head)
        if weights is not None:
            per_token = losses.closed_form_forward_kl(
                student_rows, teacher_rows, *weights, self.temperature, self.chunk_size
            )
        elif self.loss == "sampled_token":
            per_token = self._sampled_token(student_rows, teacher_rows, student_head, teacher_head, seqs)
        else:
            per_token = losses.chunked_token_loss(
                student_rows, teacher_rows, student_head, teacher_head, self.divergence, self.chunk_size
            )
        return self._token_options(per_token, seqs)

    def served_token_losses(self, student: nn.Module, seqs: Sequences, scores: TeacherScores) -> Tensor:
        """Per-response-token losses of ``seqs`` against a served teacher's top-k ``scores`` (aligned with the
        response): ``topk`` on the teacher's support, or ``sampled_token`` from the token's own log-prob."""
        mask = seqs.response_mask.bool()
        rows, head = self._student_rows(student, seqs), output_head(student)
        ids, top_logprobs, token_logprobs = scores.flat(mask)
        if self.loss == "sampled_token":
            student_lp = losses.chunked_token_loss(
                rows, token_logprobs[:, None], head, _identity, _student_token, self.chunk_size, seqs.response_ids[mask]
            )
            per_token = losses.sampled_token_loss(student_lp, token_logprobs, seqs.token_behavior_logprobs(student_lp))
        else:
            divergence = partial(losses.served_topk_divergence, beta=self.beta, tail=self.top_k_tail)
            per_token = losses.chunked_token_loss(rows, top_logprobs, head, _identity, divergence, self.chunk_size, ids)
        return self._token_options(per_token, seqs)

    def _student_rows(self, student: nn.Module, seqs: Sequences) -> Tensor:
        hidden = last_hidden(student, seqs.student_ids, seqs.student_mask)
        return response_rows(hidden, seqs.prompt_width, seqs.response_mask)

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
                rows, top_logprobs, head, _identity, stats, self.chunk_size, ids, token_logprobs
            )
        student_rows, teacher_rows, teacher_head = self.response_hidden(student, scorer, seqs)
        token_ids = seqs.response_ids[seqs.response_mask.bool()]
        return losses.chunked_token_loss(
            student_rows,
            teacher_rows,
            output_head(student),
            teacher_head,
            token_distribution_stats,
            self.chunk_size,
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

    def closed_form_weights(self, student_head, teacher_head, strict: bool = False) -> tuple[Tensor, Tensor] | None:
        """The one place that decides whether forward KL runs in closed form: the two heads' weights when it does.

        ``closed_form`` requires it (a head it cannot use raises); ``auto`` takes it for forward KL (``loss: jsd``,
        ``beta: 0``) on plain heads; ``checkpointed`` never does. ``strict`` raises where ``auto`` would fall back.
        """
        if self.implementation == "checkpointed" or self.loss != "jsd" or self.beta != 0.0:
            return None
        try:
            return linear_weight(student_head), linear_weight(teacher_head)
        except ValueError:  # a soft-capped, biased or sharded head: the checkpointed path computes the same loss
            if self.implementation == "closed_form" or strict:
                raise
            return None

    @property
    def divergence(self) -> Callable[[Tensor, Tensor], Tensor]:
        if self.loss == "jsd":
            return partial(losses.generalized_jsd, beta=self.beta, temperature=self.temperature)
        if self.loss == "topk":
            return partial(
                losses.topk_divergence,
                k=self.top_k,
                beta=self.beta,
                temperature=self.temperature,
                tail=self.top_k_tail,
                support=self.top_k_support,
            )
        return partial(
            losses.pointwise_clipped_divergence, beta=self.beta, temperature=self.temperature, clip=self.pointwise_clip
        )

    def _sampled_token(self, student_rows, teacher_rows, student_head, teacher_head, seqs: Sequences) -> Tensor:
        mask = seqs.response_mask.bool()
        ids = seqs.response_ids[mask]
        logprobs = losses.chunked_token_loss(
            student_rows,
            teacher_rows,
            student_head,
            teacher_head,
            partial(_token_pair, temperature=self.temperature),
            self.chunk_size,
            ids,
        )
        student_lp, teacher_lp = logprobs[:, 0], logprobs[:, 1]
        return losses.sampled_token_loss(student_lp, teacher_lp, seqs.token_behavior_logprobs(student_lp))


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


def linear_weight(head) -> Tensor:
    """The weight of a plain bias-free linear output head (what the closed-form forward KL needs)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        raise ValueError(
            "loss_implementation: closed_form needs a bias-free linear output head without logit soft-capping: "
            "use loss_implementation: checkpointed for this model."
        )
    if isinstance(head.weight, DTensor):
        raise ValueError("loss_implementation: closed_form does not run sharded yet: use checkpointed under FSDP.")
    return head.weight


def grid(per_token: Tensor, mask: Tensor) -> Tensor:
    """Per-token values laid out as the [B, L] response grid (0 off the mask)."""
    return per_token.new_zeros(mask.shape).masked_scatter(mask.bool(), per_token)


def _identity(x: Tensor) -> Tensor:
    """The "head" of served scores: they arrive as log-probs already."""
    return x


def _student_token(student_logits: Tensor, teacher_scores: Tensor, ids: Tensor) -> Tensor:
    return losses.token_logprobs(student_logits, ids)


def _token_pair(student_logits: Tensor, teacher_logits: Tensor, ids: Tensor, temperature: float) -> Tensor:
    """[n, 2]: the student's and the teacher's log-prob of each token."""
    return torch.stack(
        [
            losses.token_logprobs(student_logits, ids, temperature),
            losses.token_logprobs(teacher_logits, ids, temperature),
        ],
        -1,
    )
