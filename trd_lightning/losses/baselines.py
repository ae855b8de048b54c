"""Token-level baselines of the TRD comparison: loss truncation, per-entry clipping, top-k reverse KL, TOPD-style.

They act on per-token (or per-entry) divergences, downstream of a prefix failure; TRD instead rewrites the
trajectory. Same divergence convention as ``trd_lightning.losses.divergence``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from trd_lightning.losses.divergence import (
    _LOG_FLOOR,
    _check,
    _check_clip,
    _divergence_terms,
    _scaled_logprobs,
    topk_divergence,
)


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


def topk_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, k: int = 32, temperature: float = 1.0) -> Tensor:
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
