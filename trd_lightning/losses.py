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
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

__all__ = [
    "generalized_jsd",
    "divergence_from_logprobs",
    "topk_divergence",
    "sampled_token_loss",
    "token_logprobs",
    "chunked_token_loss",
    "masked_divergence",
    "kl_token_clip",
    "pointwise_clipped_divergence",
    "topk_reverse_kl",
    "persistent_divergence_mask",
    "near_future_weights",
    "topd_token_loss",
]

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


def _kl_terms(logp: Tensor, logq: Tensor) -> Tensor:
    """Per-entry terms ``p(v) (log p(v) - log q(v))`` of KL(p || q), from (floored) log-probs."""
    return logp.exp() * (logp - logq)


def _log_mixture(logp_s: Tensor, logp_t: Tensor, beta: float) -> Tensor:
    """``log((1 - beta) p_S + beta p_T)`` for ``0 < beta < 1``."""
    # Mixing in probability space would underflow for tokens both models find
    # unlikely; logsumexp keeps log M accurate there.
    return torch.logsumexp(torch.stack([logp_s + math.log1p(-beta), logp_t + math.log(beta)]), dim=0)


def _divergence_terms(logp_s: Tensor, logp_t: Tensor, beta: float) -> Tensor:
    """Per-vocabulary-entry terms whose sum over the last dim is the divergence.

    ``beta`` follows the module docstring; the log-probs must already be floored.
    """
    if beta == 0.0:
        return _kl_terms(logp_t, logp_s)
    if beta == 1.0:
        return _kl_terms(logp_s, logp_t)
    log_m = _log_mixture(logp_s, logp_t, beta)
    return beta * _kl_terms(logp_t, log_m) + (1.0 - beta) * _kl_terms(logp_s, log_m)


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


def sampled_token_loss(student_logp: Tensor, teacher_logp: Tensor, behavior_logp: Tensor) -> Tensor:
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

    Returns:
        The per-token loss, shape ``[...]``, float32.
    """
    student_logp = student_logp.float()
    advantage = -(student_logp - teacher_logp.float()).detach()
    ratio = torch.exp(student_logp - behavior_logp.float().detach())
    return -(advantage * ratio)


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


def chunked_token_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    student_head: Callable[[Tensor], Tensor],
    teacher_head: Callable[[Tensor], Tensor],
    loss_fn: Callable[..., Tensor],
    chunk_size: int = 1024,
    *aux: Tensor,
) -> Tensor:
    """Per-row loss over hidden states without materialising all logits.

    Rows are processed ``chunk_size`` at a time: the student head runs with
    grad, the teacher head under ``torch.no_grad()``, and
    ``loss_fn(student_logits, teacher_logits, *aux_chunks)`` must return one
    value per row. While grad is enabled each chunk runs under non-reentrant
    activation checkpointing, so autograd keeps only the hidden-state chunk
    and recomputes that chunk's logits (both models) in backward: at most one
    chunk of ``[n, V]`` logits is alive at a time, in forward and in backward.

    ``aux`` follows ``chunk_size``, so pass ``chunk_size`` positionally with aux.

    Args:
        student_hidden: Student hidden states, ``[N, H]`` (usually requires grad).
        teacher_hidden: Teacher hidden states, ``[N, H']``.
        student_head: Maps ``[n, H]`` to student logits ``[n, V]``.
        teacher_head: Maps ``[n, H']`` to teacher logits ``[n, V]``.
        loss_fn: ``(student_logits, teacher_logits, *aux_chunks) -> [n]``.
        chunk_size: Rows per chunk (>= 1).
        *aux: Extra ``[N, ...]`` tensors sliced along dim 0 with the rows.

    Returns:
        Per-row losses ``[N]``, connected to the autograd graph.

    Raises:
        ValueError: If ``chunk_size < 1`` or the row counts differ.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n = student_hidden.shape[0]
    if teacher_hidden.shape[0] != n:
        raise ValueError(
            f"student_hidden has {n} rows but teacher_hidden has {teacher_hidden.shape[0]}"
        )
    for i, a in enumerate(aux):
        if a.shape[0] != n:
            raise ValueError(f"aux[{i}] has {a.shape[0]} rows, expected {n}")
    if n == 0:
        # Route the empty result through the head so that .sum().backward()
        # works and gives zero (not missing) gradients to hidden and head.
        return student_head(student_hidden).float().sum(-1)

    def chunk_loss(s_chunk: Tensor, t_chunk: Tensor, *aux_chunk: Tensor) -> Tensor:
        student_logits = student_head(s_chunk)
        with torch.no_grad():
            teacher_logits = teacher_head(t_chunk)
        return loss_fn(student_logits, teacher_logits, *aux_chunk)

    # Checkpoint whenever autograd is recording, not only when the hidden
    # requires grad: a trainable head on a frozen trunk needs it just as much.
    use_checkpoint = torch.is_grad_enabled()
    outs = []
    for start in range(0, n, chunk_size):
        rows = slice(start, start + chunk_size)
        args = (student_hidden[rows], teacher_hidden[rows], *(a[rows] for a in aux))
        if use_checkpoint:
            outs.append(checkpoint(chunk_loss, *args, use_reentrant=False))
        else:
            outs.append(chunk_loss(*args))
    return torch.cat(outs)


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


# ------------------------------------------------- token-level clipping baselines


def kl_token_clip(per_token: Tensor, clip: float = 0.1) -> Tensor:
    """Loss truncation: each position's divergence clamped from above at ``clip``.

    ``torch.clamp(max=clip)``: a position whose divergence exceeds ``clip``
    contributes the constant ``clip`` and no gradient at all, so the update
    comes only from the positions below the clip. (A position exactly at the
    clip keeps its gradient, as with ``torch.clamp``.)

    Args:
        per_token: Per-position divergences, shape ``[...]`` (e.g. the output
            of :func:`generalized_jsd`).
        clip: Positive ceiling.

    Returns:
        The clamped per-position loss, shape ``[...]``, float32.

    Raises:
        ValueError: If ``clip <= 0``.
    """
    _check_clip(clip)
    return per_token.float().clamp(max=clip)


def pointwise_clipped_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 0.0,
    temperature: float = 1.0,
    clip: float = 0.05,
) -> Tensor:
    """Divergence whose per-vocabulary-entry terms are clamped from above (OPSD).

    Each position's divergence (``beta`` as in the module docstring) is a sum
    over the vocabulary of per-entry terms: ``p_T(v) (log p_T(v) - log p_S(v))``
    at ``beta == 0``, ``p_S(v) (log p_S(v) - log p_T(v))`` at ``beta == 1`` and,
    for ``0 < beta < 1``, ``beta p_T(v) (log p_T(v) - log M(v)) +
    (1 - beta) p_S(v) (log p_S(v) - log M(v))`` (the two KL-to-mixture terms of
    the same entry combined before clamping, as OPSD's ``jsd_token_clip``
    clamps TRL's element-wise JSD). Each entry's term is clamped from above
    at ``clip`` and the clamped terms are summed over ``v``.

    Entries are not clamped from below. At ``beta`` 0 and 1 they can be
    negative (wherever the distribution inside the log's denominator puts
    more mass on ``v``), so the result is no longer a divergence and can be
    negative when large positive entries are clamped; the combined interior
    entries are non-negative (log-sum inequality). A clamped entry is a constant: it passes no gradient, and the
    update comes from the unclamped entries only. With ``clip`` above every
    entry this equals :func:`generalized_jsd`.

    Gradients flow through both arguments; detach the teacher if needed.

    Args:
        student_logits: Student logits, shape ``[..., V]``.
        teacher_logits: Teacher logits, same shape.
        beta: Interpolation in ``[0, 1]`` (see the module docstring).
        temperature: Positive divisor applied to both logits.
        clip: Positive ceiling on each vocabulary entry's term.

    Returns:
        The per-position clipped divergence, shape ``[...]``, float32.

    Raises:
        ValueError: If ``beta`` is outside ``[0, 1]``, ``temperature <= 0`` or
            ``clip <= 0``.
    """
    _check(beta, temperature)
    _check_clip(clip)
    s = _scaled_logprobs(student_logits, temperature).clamp(min=_LOG_FLOOR)
    t = _scaled_logprobs(teacher_logits, temperature).clamp(min=_LOG_FLOOR)
    return _divergence_terms(s, t, beta).clamp(max=clip).sum(-1)


def topk_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, k: int = 32, temperature: float = 1.0
) -> Tensor:
    """Reverse KL on the teacher's top-k tokens, both models renormalised there.

    The baseline ``KL(S_k || T_k)`` where ``S_k`` and ``T_k`` are the
    (temperature-scaled) student and teacher distributions restricted to the
    teacher's ``k`` most likely tokens and renormalised over them; mass the
    student puts outside that support is ignored. An alias of
    ``topk_divergence(..., k, beta=1.0, tail=False, support="teacher")``.

    Args:
        student_logits: Student logits, shape ``[..., V]``.
        teacher_logits: Teacher logits, same shape; never receives gradient.
        k: Support size (>= 1), clamped to ``V``.
        temperature: Positive divisor applied to both logits.

    Returns:
        The per-position divergence, shape ``[...]``, float32.

    Raises:
        ValueError: If ``k < 1`` or ``temperature <= 0``.
    """
    return topk_divergence(
        student_logits, teacher_logits, k, beta=1.0, temperature=temperature, tail=False, support="teacher"
    )


# ------------------------------------------------------ TOPD-style weighting
#
# Our reading of the TOPD abstract (see topd_token_loss); the three functions
# act on per-token divergences laid out [..., L] (one sequence [L] or a batch
# [B, L]) with a same-shaped response mask.


def _check_topd_inputs(values: Tensor, mask: Tensor, window: int) -> None:
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if values.shape != mask.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(values.shape)}")


def persistent_divergence_mask(per_token: Tensor, mask: Tensor, threshold: float, window: int) -> Tensor:
    """Positions whose high divergence persists over the near future.

    Position ``t`` is divergent when ``mask[t]``, ``per_token[t] > threshold``
    and the mean of ``per_token`` over the valid positions among
    ``t+1 .. t+window`` also exceeds ``threshold``; with no valid position in
    that range the divergence does not persist. The window is counted in
    positions, not in valid tokens (the same thing for a contiguous response
    mask). Values at masked positions are never read, so padding may hold
    anything, NaN included. Part of our TOPD reading, see
    :func:`topd_token_loss`.

    Args:
        per_token: Per-token divergences, ``[L]`` or ``[B, L]`` (any ``[..., L]``).
        mask: Response mask, same shape; nonzero/True positions are valid.
        threshold: Non-negative divergence threshold.
        window: How many following positions (>= 1) must stay divergent on average.

    Returns:
        A bool tensor, same shape as ``per_token``; never requires grad.

    Raises:
        ValueError: If ``window < 1``, ``threshold < 0`` or the shapes differ.
    """
    _check_topd_inputs(per_token, mask, window)
    if not threshold >= 0.0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    valid = mask.bool()
    # where, not multiply: 0 * NaN in padding would poison the window sums.
    x = torch.where(valid, per_token.detach().float(), 0.0)

    def future_sum(v: Tensor) -> Tensor:
        # Unfold's window i covers i..i+window-1, so after dropping window 0
        # entry t sums t+1..t+window; the right padding stands in for
        # positions past the end (no Python loop over positions).
        return F.pad(v, (0, window)).unfold(-1, window, 1)[..., 1:, :].sum(-1)

    total, count = future_sum(x), future_sum(valid.float())
    persists = (count > 0) & (total / count.clamp(min=1.0) > threshold)
    return valid & (x > threshold) & persists


def near_future_weights(divergent: Tensor, mask: Tensor, window: int, discount: float = 0.9) -> Tensor:
    """Token weights spreading each divergent state's guidance over its near future.

    ``weight[s] = sum over divergent t with t <= s <= t + window of
    discount ** (s - t)`` (positions, as in :func:`persistent_divergence_mask`),
    so overlapping windows add up; positions no divergent state covers get 0,
    masked positions get 0, and a divergent flag at a masked position is
    ignored. Part of our TOPD reading, see :func:`topd_token_loss`.

    Args:
        divergent: Bool divergent-state flags, ``[L]`` or ``[B, L]`` (any ``[..., L]``).
        mask: Response mask, same shape; nonzero/True positions are valid.
        window: How many following positions (>= 1) each divergent state covers.
        discount: Per-position decay in ``(0, 1]``.

    Returns:
        The float32 weights, same shape as ``divergent``; never requires grad.

    Raises:
        ValueError: If ``window < 1``, ``discount`` is outside ``(0, 1]`` or
            the shapes differ.
    """
    _check_topd_inputs(divergent, mask, window)
    if not 0.0 < discount <= 1.0:
        raise ValueError(f"discount must be in (0, 1], got {discount}")
    valid = mask.bool()
    src = (divergent.bool() & valid).float()
    # After left-padding, unfold's window s holds the flags of s-window..s;
    # entry j of it lies s - t = window - j positions back.
    windows = F.pad(src, (window, 0)).unfold(-1, window + 1, 1)
    powers = discount ** torch.arange(window, -1, -1, dtype=torch.float64, device=src.device)
    weights = (windows * powers.float()).sum(-1)
    return torch.where(valid, weights, 0.0)


def topd_token_loss(
    per_token: Tensor,
    mask: Tensor,
    threshold: float = 1.0,
    window: int = 4,
    discount: float = 0.9,
) -> Tensor:
    """TOPD-style per-token loss: guidance only at persistently divergent states.

    This is OUR READING of the abstract of TOPD ("Bridging Reasoning
    Trajectories in On-Policy Distillation via Near-Future Guidance",
    arXiv 2606.00305), not the authors' algorithm: only the abstract is
    public, and no code of theirs. The abstract reports that about 30% of
    high-loss tokens are surface-form mismatches rather than real reasoning
    forks, that real divergence unfolds as short-horizon drift, and that TOPD
    uses near-future information to find the truly divergent states and
    spreads guidance over several future tokens. We turn that into: a
    position is a divergent state when its divergence and the mean divergence
    of the next ``window`` positions both exceed ``threshold``
    (:func:`persistent_divergence_mask`); each divergent state weights itself
    and the next ``window`` positions by ``discount ** distance``
    (:func:`near_future_weights`); the loss is ``per_token * weights``. A
    lone high-loss token (a surface-form mismatch, in the abstract's terms)
    thus gets weight 0, and the tokens after a real fork get guidance even
    when their own divergence is low.

    Weights are constants (no gradient flows through the selection), so the
    gradient with respect to ``per_token`` is the weights.

    Args:
        per_token: Per-token divergences, ``[L]`` or ``[B, L]`` (any ``[..., L]``).
        mask: Response mask, same shape; nonzero/True positions are valid.
        threshold: Non-negative divergence threshold.
        window: Near-future horizon (>= 1), for both persistence and spreading.
        discount: Per-position decay of the spread guidance, in ``(0, 1]``.

    Returns:
        The weighted per-token loss, same shape, float32; 0 at masked positions.

    Raises:
        ValueError: If ``window < 1``, ``discount`` is outside ``(0, 1]``,
            ``threshold < 0`` or the shapes differ.
    """
    divergent = persistent_divergence_mask(per_token, mask, threshold, window)
    weights = near_future_weights(divergent, mask, window, discount).detach()
    # where, not multiply: padding may hold inf/NaN, and 0 * inf = NaN.
    return torch.where(mask.bool(), per_token.float() * weights, 0.0)
