"""Losses against a served teacher, which sends its top-k log-probs per position instead of its logits.

The teacher's top-k log-probs are normalised over its whole vocabulary, so its tail bucket (the mass outside the
top-k) is ``1 - sum(exp(top-k))``; the student's is the log-sum-exp of its log-probs outside the same ids. With
the teacher's top-k and the same convention (``beta`` as in ``divergence``), these equal ``topk_divergence`` on the
teacher's full logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from trd_lightning.losses.divergence import divergence_from_logprobs


def served_topk_divergence(
    student_logits: Tensor, teacher_logprobs: Tensor, teacher_ids: Tensor, beta: float = 0.0, tail: bool = True
) -> Tensor:
    """The top-k divergence on the teacher's support, from the student's logits and the teacher's top-k.

    Args:
        student_logits: [..., V] student logits (untempered; a served teacher's log-probs are untempered too).
        teacher_logprobs: [..., k] the teacher's log-probs of ``teacher_ids`` (normalised over its vocabulary).
        teacher_ids: [..., k] distinct token ids, the teacher's top-k.
        beta: 0 forward KL(teacher || student), 1 reverse KL, in between the generalized JSD.
        tail: add a bin for the mass outside the support (else renormalise both over the support).

    Returns:
        The per-position divergence [...], float32.
    """
    ids = teacher_ids.long()
    student = F.log_softmax(student_logits.float(), dim=-1)
    s_top = student.gather(-1, ids)
    t_top = teacher_logprobs.float().detach()
    if not tail:
        return divergence_from_logprobs(F.log_softmax(s_top, -1), F.log_softmax(t_top, -1), beta)
    in_support = torch.zeros_like(student, dtype=torch.bool).scatter_(-1, ids, True)
    s_tail = torch.logsumexp(student.masked_fill(in_support, float("-inf")), dim=-1, keepdim=True)
    # In float64: the tail mass is a difference of numbers near 1 when the top-k holds nearly everything.
    mass = t_top.double().exp().sum(-1, keepdim=True)
    t_tail = torch.log((1.0 - mass).clamp(min=0.0)).float()
    # A support of the whole vocabulary leaves no tail: what 1 - mass holds then is rounding, not mass.
    t_tail = t_tail.masked_fill(in_support.all(-1, keepdim=True), float("-inf"))
    return divergence_from_logprobs(torch.cat([s_top, s_tail], -1), torch.cat([t_top, t_tail], -1), beta)


def served_token_statistics(
    student_logits: Tensor, teacher_logprobs: Tensor, teacher_ids: Tensor, token_logprobs: Tensor
) -> Tensor:
    """[n, 5] per-token statistics (``diagnostics.STAT_COLUMNS``) from a served teacher's top-k: forward KL and the
    teacher's entropy over the top-k plus one tail bin (lower bounds of the full-vocabulary values), its top-1 and
    top-2 probabilities, and its log-prob of the rollout token (both exact)."""
    kl = served_topk_divergence(student_logits, teacher_logprobs, teacher_ids, 0.0, True)
    top = teacher_logprobs.float()
    p = top.exp()
    tail = (1.0 - p.double().sum(-1)).clamp(min=0.0).float()
    if top.shape[-1] >= student_logits.shape[-1]:  # the whole vocabulary: no tail, only rounding
        tail = torch.zeros_like(tail)
    entropy = -(p * top).sum(-1) - torch.xlogy(tail, tail)
    probs = p.sort(-1, descending=True).values
    second = probs[:, 1] if probs.shape[-1] > 1 else torch.zeros_like(probs[:, 0])
    return torch.stack([kl, entropy, probs[:, 0], second, token_logprobs.float()], -1)
