"""The generalized JSD and its gradient with respect to the student's logits, in closed form, from one softmax pass.

Same convention as ``divergence`` (``beta`` 0 forward KL(T || S), 1 reverse KL(S || T), in between the generalized
JSD with the mixture ``M = (1 - beta) p_S + beta p_T``), and the same KL term (``divergence.kl_terms``). With
``z_S`` the student's logits, ``T`` the temperature and ``<a> = sum_v p_S(v) a(v)``, the gradients are:

* ``beta == 0``: ``(p_S - p_T) / T``.
* ``beta == 1``: ``p_S (d - <d>) / T`` with ``d = log p_S - log p_T`` (``<d>`` is the loss itself).
* ``0 < beta < 1``: ``(1 - beta) p_S (a - <a>) / T`` with ``a = log p_S - log M`` (``<a>`` is KL(S || M)): the
  loss depends on ``p_S`` with partial derivative ``(1 - beta) a`` (the mixture's share cancels the rest),
  and the softmax's Jacobian turns that into the above.

One pass of ``exp`` per model gives both the log-probs and the probabilities, and the gradient reuses the loss's
own pieces (the probabilities, the log-ratio, the row's KL), with no autograd graph.
"""

from __future__ import annotations

from torch import Tensor

from trd_lightning.losses.divergence import _LOG_FLOOR, _log_mixture, kl_terms


def log_probs_and_probs(logits: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """``log_softmax(logits / temperature)`` (floored) and ``softmax`` of the same, from one pass of ``exp``."""
    scaled = logits.float() / temperature if temperature != 1.0 else logits.float()
    shifted = scaled - scaled.amax(-1, keepdim=True)
    probs = shifted.exp()
    total = probs.sum(-1, keepdim=True)
    probs.div_(total)
    return shifted.sub_(total.log_()).clamp_(min=_LOG_FLOOR), probs


def jsd_and_grad(
    student_logits: Tensor, teacher_logits: Tensor, beta: float, temperature: float, with_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Per-row generalized JSD of two logit blocks and, optionally, its gradient with respect to the student's.

    Args:
        student_logits: ``[n, V]`` student logits.
        teacher_logits: ``[n, V]`` teacher logits.
        beta: in ``[0, 1]``, as in ``divergence``.
        temperature: positive divisor of both models' logits.
        with_grad: whether to return the gradient too.

    Returns:
        ``[n]`` float32 values, and the ``[n, V]`` float32 gradient of their sum with respect to
        ``student_logits`` (None without ``with_grad``).
    """
    logp_s, p_s = log_probs_and_probs(student_logits, temperature)
    logp_t, p_t = log_probs_and_probs(teacher_logits, temperature)
    if beta == 0.0:
        loss = kl_terms(logp_t, logp_s, p_t).sum(-1)
        grad = p_s.sub_(p_t) if with_grad else None
    elif beta == 1.0:
        loss = kl_terms(logp_s, logp_t, p_s).sum(-1)
        grad = p_s.mul_(logp_s.sub_(logp_t).sub_(loss[:, None])) if with_grad else None
    else:
        log_m = _log_mixture(logp_s, logp_t, beta)
        kl_student = kl_terms(logp_s, log_m, p_s).sum(-1)
        loss = beta * kl_terms(logp_t, log_m, p_t).sum(-1) + (1.0 - beta) * kl_student
        grad = p_s.mul_(logp_s.sub_(log_m).sub_(kl_student[:, None])).mul_(1.0 - beta) if with_grad else None
    if grad is not None and temperature != 1.0:
        grad.div_(temperature)
    return loss, grad
