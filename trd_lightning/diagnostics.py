"""Pure measurements of prefix failure: gradient agreement across sequences and the teacher's shape per token.

The definitions are ours (the TRD paper's Section 4 measurements are not public in full):

- ``grad_cosine``: the mean pairwise cosine between per-sequence gradients g_1..g_K.
- ``coherence``: |sum g_i|^2 / (K sum |g_i|^2); 1 when all gradients are equal, 1/K when orthogonal with equal
  norms, 0 when they cancel.
- ``prefix_conflict``: the cosine between the gradient of a sequence's tokens before its first divergence and
  that of the tokens from it on.
- per token: the forward KL(teacher || student), the teacher's entropy, its top-1 and top-2 probabilities (the
  position is *bimodal* when both exceed tau) and its log-prob of the rollout's token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from trd_lightning.losses import divergence_from_logprobs

STAT_COLUMNS = ("kl", "teacher_entropy", "teacher_top1", "teacher_top2", "teacher_token_logprob")


def gradient_agreement(grads: Tensor) -> tuple[float, float]:
    """(mean pairwise cosine, coherence) of ``grads`` [K, P], one flattened gradient per sequence, K >= 2.

    A zero gradient has no direction; its cosines count as 0.
    """
    if grads.shape[0] < 2:
        raise ValueError(f"gradient agreement needs at least 2 gradients, got {grads.shape[0]}")
    g = grads.double()
    gram = g @ g.T
    norms = gram.diagonal().sqrt()
    cos = gram / (norms[:, None] * norms[None, :]).clamp_min(1e-300)
    k = g.shape[0]
    pairwise = cos[~torch.eye(k, dtype=torch.bool, device=g.device)].mean()
    coherence = gram.sum() / (k * gram.diagonal().sum()).clamp_min(1e-300)
    return pairwise.item(), coherence.item()


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine between two flattened gradients, in float64 (0 when either is zero)."""
    a, b = a.double(), b.double()
    return (a @ b / (a.norm() * b.norm()).clamp_min(1e-300)).item()


def token_distribution_stats(student_logits: Tensor, teacher_logits: Tensor, token_ids: Tensor) -> Tensor:
    """[n, 5] per-token statistics, columns ``STAT_COLUMNS``, from [n, V] logits and the [n] rollout tokens."""
    s_logp = torch.log_softmax(student_logits.float(), -1)
    t_logp = torch.log_softmax(teacher_logits.float(), -1)
    t_p = t_logp.exp()
    kl = divergence_from_logprobs(s_logp, t_logp, beta=0.0)  # the package's one forward-KL term
    entropy = -(t_p * t_logp).sum(-1)
    top2 = t_p.topk(2, dim=-1).values
    token = t_logp.gather(-1, token_ids[:, None]).squeeze(-1)
    return torch.stack([kl, entropy, top2[:, 0], top2[:, 1], token], dim=-1)


def first_divergence(token_logprobs: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """Per row, the first response position whose teacher log-prob falls below ``threshold``; -1 if none.

    Args:
        token_logprobs: [B, L] the teacher's log-probs of the rollout's tokens.
        mask: [B, L] True on response tokens.
        threshold: a log-prob, e.g. log(0.05).
    """
    low = (token_logprobs < threshold) & mask.bool()
    first = low.float().argmax(-1)
    return torch.where(low.any(-1), first, torch.full_like(first, -1))


def prefix_stats(stats: dict[str, Tensor], mask: Tensor, first: Tensor, tau: float) -> dict[str, float]:
    """Teacher shape and divergence statistics of a set of rollouts.

    Args:
        stats: [B, L] grids, at least ``kl``, ``teacher_entropy`` and ``teacher_top2``.
        mask: [B, L] True on response tokens.
        first: [B] first divergence per row (-1: none).
        tau: a position is bimodal when the teacher's top-2 probabilities both exceed it.

    Returns ``bimodal_frac`` and ``entropy`` (over all response tokens), ``first_divergence`` (the mean over
    diverging rows of position / length), ``diverged_frac`` (the share of rows that diverge), and ``kl_before``,
    ``kl_after`` (the mean per-token KL before the first divergence and from it on, over diverging rows).
    """
    mask = mask.bool()
    lengths = mask.sum(-1)
    positions = torch.arange(mask.shape[1], device=mask.device)[None, :]
    diverged = first >= 0
    before = (positions < first[:, None]) & mask & diverged[:, None]
    after = (positions >= first[:, None]) & mask & diverged[:, None]
    kl = stats["kl"]

    def mean(values: Tensor, where: Tensor) -> float:
        return values[where].double().mean().item() if where.any() else float("nan")

    out = {
        "bimodal_frac": mean((stats["teacher_top2"] > tau).double(), mask),
        "entropy": mean(stats["teacher_entropy"], mask),
        "diverged_frac": diverged.double().mean().item() if len(first) else float("nan"),
        "first_divergence": mean(first.double() / lengths.clamp_min(1), diverged),
        "kl_before": mean(kl, before),
        "kl_after": mean(kl, after),
    }
    return out
