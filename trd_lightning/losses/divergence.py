"""Distillation losses: pure functions on tensors.

All math is float32 (inputs are upcast with ``.float()``) whatever the input
dtype: log-softmax differences over a large vocabulary are too coarse in bf16.

Divergence convention (shared by every function in this module), with
``p_S`` the student and ``p_T`` the teacher distribution over the last dim:

* ``beta == 0``: forward KL, ``KL(T || S) = sum_v p_T(v) (log p_T(v) - log p_S(v))``.
* ``beta == 1``: reverse KL, ``KL(S || T) = sum_v p_S(v) (log p_S(v) - log p_T(v))``.
* ``0 < beta < 1``: generalized Jensen-Shannon divergence as in TRL / GKD /
  OPSD. With the mixture ``M = (1 - beta) p_S + beta p_T`` (computed in log
  space with logsumexp), the loss is
  ``beta KL(T || M) + (1 - beta) KL(S || M)``.

The endpoints are special-cased to be exactly the two KLs. The interior is
*not* rescaled to be continuous with them (the JSD tends to 0 as beta tends to
0 or 1); this matches TRL's ``generalized_jsd_loss`` so OPSD/TRL
hyperparameters transfer unchanged.

``temperature`` divides both logits before the log-softmax.

KL terms are ``p * (log p - log q)`` with ``p = exp(log p)``, so a probability
that underflows contributes ``0 * finite = 0``. Log-probs of exactly ``-inf``
(``-inf`` logits, e.g. a masked vocabulary entry) are floored to the most
negative finite float so neither value nor gradient becomes NaN.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Finite stand-in for log(0): exp() of it is exactly 0, and differences with
# other (non-positive) log-probs stay finite, unlike -inf - -inf = NaN.
_LOG_FLOOR = torch.finfo(torch.float32).min


def _check(beta: float = 0.0, temperature: float = 1.0) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_clip(clip: float) -> None:
    if not clip > 0.0:
        raise ValueError(f"clip must be > 0, got {clip}")


def _scaled_logprobs(logits: Tensor, temperature: float) -> Tensor:
    """``log_softmax(logits / temperature)`` over the last dim, in float32."""
    return F.log_softmax(logits.float() / temperature, dim=-1)


def kl_terms(logp: Tensor, logq: Tensor, p: Tensor | None = None) -> Tensor:
    """Per-entry terms ``p(v) (log p(v) - log q(v))`` of KL(p || q): the one KL term of the package.

    Every KL here (the divergences, the closed form, the diagnostics) sums these terms, so all of them treat a
    probability that underflows the same way: ``0 * finite = 0``.

    Args:
        logp: Log-probs of ``p``, floored (see the module docstring), shape ``[..., V]``.
        logq: Log-probs of ``q``, floored, same shape.
        p: ``exp(logp)`` when the caller has it already (saves one pass of ``exp``).

    Returns:
        The terms, shape ``[..., V]``; their sum over the last dim is KL(p || q).
    """
    return (logp.exp() if p is None else p) * (logp - logq)


def _log_mixture(logp_s: Tensor, logp_t: Tensor, beta: float) -> Tensor:
    """``log((1 - beta) p_S + beta p_T)`` for ``0 < beta < 1``."""
    # Mixing in probability space would underflow for tokens both models find
    # unlikely; logaddexp keeps log M accurate there.
    return torch.logaddexp(logp_s + math.log1p(-beta), logp_t + math.log(beta))


def _divergence_terms(logp_s: Tensor, logp_t: Tensor, beta: float) -> Tensor:
    """Per-vocabulary-entry terms whose sum over the last dim is the divergence.

    ``beta`` follows the module docstring; the log-probs must already be floored.
    """
    if beta == 0.0:
        return kl_terms(logp_t, logp_s)
    if beta == 1.0:
        return kl_terms(logp_s, logp_t)
    log_m = _log_mixture(logp_s, logp_t, beta)
    return beta * kl_terms(logp_t, log_m) + (1.0 - beta) * kl_terms(logp_s, log_m)


def divergence_from_logprobs(student_logp: Tensor, teacher_logp: Tensor, beta: float) -> Tensor:
    """Divergence between two distributions given as normalised log-probs.

    See the module docstring for the ``beta`` convention.

    Args:
        student_logp: Student log-probs, shape ``[..., V]``, normalised over
            the last dim.
        teacher_logp: Teacher log-probs, same shape as ``student_logp``.
        beta: Interpolation in ``[0, 1]``; 0 is forward KL, 1 reverse KL.

    Returns:
        The per-position divergence, shape ``[...]``, float32.

    Raises:
        ValueError: If ``beta`` is outside ``[0, 1]``.
    """
    _check(beta)
    s = student_logp.float().clamp(min=_LOG_FLOOR)
    t = teacher_logp.float().clamp(min=_LOG_FLOOR)
    return _divergence_terms(s, t, beta).sum(-1)


def generalized_jsd(
    student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.0, temperature: float = 1.0
) -> Tensor:
    """Generalized JSD (forward KL at beta=0, reverse KL at beta=1) from logits.

    Gradients flow through both arguments; detach the teacher if needed.

    Args:
        student_logits: Student logits, shape ``[..., V]``.
        teacher_logits: Teacher logits, same shape.
        beta: Interpolation in ``[0, 1]`` (see the module docstring).
        temperature: Positive divisor applied to both logits.

    Returns:
        The per-position divergence, shape ``[...]``, float32.

    Raises:
        ValueError: If ``beta`` is outside ``[0, 1]`` or ``temperature <= 0``.
    """
    _check(beta, temperature)
    student_logp = _scaled_logprobs(student_logits, temperature)
    teacher_logp = _scaled_logprobs(teacher_logits, temperature)
    return divergence_from_logprobs(student_logp, teacher_logp, beta)


def _with_tail(logp: Tensor, support: Tensor) -> Tensor:
    """Log-probs on ``support`` plus one bin for all remaining mass: ``[..., k+1]``."""
    top = logp.gather(-1, support)
    # logsumexp over the complement, not log(1 - sum(top)): it stays accurate
    # (and its gradient bounded) when the tail mass is tiny, where 1 - sum
    # cancels. With k == V the complement is empty: -inf, which the divergence
    # floors; masked_fill's backward zeroes logsumexp's NaN for an all -inf row.
    in_support = torch.zeros_like(logp, dtype=torch.bool).scatter_(-1, support, True)
    tail = torch.logsumexp(logp.masked_fill(in_support, float("-inf")), dim=-1, keepdim=True)
    return torch.cat([top, tail], dim=-1)


def topk_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    k: int,
    beta: float = 0.0,
    temperature: float = 1.0,
    tail: bool = True,
    support: str = "teacher",
) -> Tensor:
    """Divergence restricted to the top-k tokens of one model.

    With ``tail=True`` each distribution becomes its (temperature-scaled)
    probabilities on the support plus one tail bin holding the remaining mass:
    proper distributions over ``k + 1`` bins, equal to the full divergence when
    ``k == V``. With ``tail=False`` both are renormalised over the support
    (``beta=1`` is then the "reverse KL on the teacher's renormalised top-k"
    baseline).

    Args:
        student_logits: Student logits, shape ``[..., V]``.
        teacher_logits: Teacher logits, same shape; never receives gradient.
        k: Support size (>= 1), clamped to ``V``.
        beta: Interpolation in ``[0, 1]`` (see the module docstring).
        temperature: Positive divisor applied to both logits.
        tail: Whether to add the tail bin instead of renormalising.
        support: ``"teacher"`` or ``"student"``: whose top-k defines the support.

    Returns:
        The per-position divergence, shape ``[...]``, float32.

    Raises:
        ValueError: On invalid ``beta``, ``temperature``, ``k`` or ``support``.
    """
    _check(beta, temperature)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if support not in ("teacher", "student"):
        raise ValueError(f"support must be 'teacher' or 'student', got {support!r}")
    teacher_logits = teacher_logits.detach()
    k = min(k, student_logits.shape[-1])
    # Temperature does not change the ordering, so top-k of the raw logits.
    ranked = teacher_logits if support == "teacher" else student_logits.detach()
    idx = ranked.topk(k, dim=-1).indices

    s_scaled = student_logits.float() / temperature
    t_scaled = teacher_logits.float() / temperature
    if tail:
        s_logp = _with_tail(F.log_softmax(s_scaled, dim=-1), idx)
        t_logp = _with_tail(F.log_softmax(t_scaled, dim=-1), idx)
    else:
        s_logp = F.log_softmax(s_scaled.gather(-1, idx), dim=-1)
        t_logp = F.log_softmax(t_scaled.gather(-1, idx), dim=-1)
    return divergence_from_logprobs(s_logp, t_logp, beta)


def sampled_token_loss(
    student_logp: Tensor, teacher_logp: Tensor, behavior_logp: Tensor, ratio_clip: float | None = None
) -> Tensor:
    """Per-token loss of the sampled-token (Thinking-Machines/tinker) estimator.

    The advantage is the stop-gradient per-token reverse-KL estimate
    ``A = -(log p_S(x) - log p_T(x))`` and the importance ratio against the
    rollout's sampling distribution is ``r = exp(log p_S(x) - log p_behavior(x))``.
    The loss is ``-(A * r)``. At ``r == 1`` (on-policy, student == behavior)
    its value is the per-token log-ratio ``log p_S(x) - log p_T(x)``, whose
    mean estimates ``KL(S || T)``; its gradient is
    ``-A * r * grad(log p_S(x))``, a REINFORCE step with reward ``A``.

    Args:
        student_logp: Student log-prob of each sampled token, shape ``[...]``.
        teacher_logp: Teacher log-prob of the same tokens, shape ``[...]``.
        behavior_logp: Log-prob under the policy that sampled the tokens.
        ratio_clip: truncated importance sampling (TIS): the ratio's weight is capped at this value, ``-(A *
            min(r, C))`` with the gradient ``-A * min(r, C) * grad(log p_S(x))``, for rollouts sampled by older
            weights (overlap) or another engine's kernels; None leaves the ratio whole.

    Returns:
        The per-token loss, shape ``[...]``, float32.
    """
    student_logp = student_logp.float()
    advantage = -(student_logp - teacher_logp.float()).detach()
    ratio = torch.exp(student_logp - behavior_logp.float().detach())
    if ratio_clip is None:
        return -(advantage * ratio)
    # exp(x - x.detach()) is 1 with the gradient of x: the capped weight multiplies grad log p_S.
    return -(advantage * ratio.detach().clamp(max=ratio_clip) * torch.exp(student_logp - student_logp.detach()))


def token_logprobs(logits: Tensor, token_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-prob of ``token_ids`` under ``log_softmax(logits / temperature)``.

    Args:
        logits: Logits, shape ``[..., V]``.
        token_ids: Integer ids, shape ``[...]``.
        temperature: Positive divisor applied to the logits.

    Returns:
        The log-probs, shape ``[...]``, float32.

    Raises:
        ValueError: If ``temperature <= 0``.
    """
    _check(temperature=temperature)
    scaled = logits.float() / temperature
    # Gather first so no second [..., V] log-softmax tensor is materialised.
    picked = scaled.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scaled, dim=-1)


def masked_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor,
    beta: float = 0.0,
    temperature: float = 1.0,
) -> Tensor:
    """Sum of :func:`generalized_jsd` over the positions where ``mask`` is true.

    A convenience for small inputs (full-vocabulary log-probs are materialised).

    Args:
        student_logits: Student logits, ``[B, T, V]``.
        teacher_logits: Teacher logits, ``[B, T, V]``.
        mask: ``[B, T]``; nonzero/True positions are included.
        beta: Interpolation in ``[0, 1]`` (see the module docstring).
        temperature: Positive divisor applied to both logits.

    Returns:
        A 0-dim float32 tensor.
    """
    mask = mask.bool()
    return generalized_jsd(student_logits[mask], teacher_logits[mask], beta, temperature).sum()
