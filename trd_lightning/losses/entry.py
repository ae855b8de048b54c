"""The one entry point from hidden states to per-token distillation losses, and the one place that picks the path.

``token_losses`` takes both models' hidden states at the response positions, their output heads and a
``LossSpec``, and returns one loss per position. ``plan`` decides how:

* ``closed_form``: the ``jsd`` family (any ``beta``) on two bias-free linear heads, unsharded: each chunk's
  value and gradient come from ``closed_form.jsd_and_grad``, in one softmax pass.
* ``linear``: any other loss on such heads, with ``fused``: each chunk's gradient comes from autograd through the
  loss on that chunk's logits, in the forward pass (``linear.linear_head_loss``, as for the closed form).
* ``checkpointed``: anything else (soft-capped, biased or sharded heads, ``fused`` off for the losses without a
  closed form, or ``implementation: checkpointed``): ``chunked.chunked_token_loss``, each chunk recomputed under
  activation checkpointing in backward.

Every path gives the same values and gradients (tested against a float64 reference); they differ in time and
memory. A chunk holds as many positions as ``chunk_mib`` allows for one float32 ``[positions, vocabulary]``
tensor (``chunk_size`` overrides it with a count), so the peak does not grow with the vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import Tensor

from trd_lightning.losses.baselines import pointwise_clipped_divergence
from trd_lightning.losses.chunked import chunked_token_loss
from trd_lightning.losses.closed_form import jsd_and_grad
from trd_lightning.losses.divergence import generalized_jsd, sampled_token_loss, token_logprobs, topk_divergence
from trd_lightning.losses.linear import linear_head_loss

LossKind = Literal["jsd", "topk", "sampled_token", "pointwise_clip"]
Implementation = Literal["auto", "checkpointed", "closed_form"]
Path = Literal["closed_form", "linear", "checkpointed"]


@dataclass(frozen=True)
class LossSpec:
    """What the per-token loss is, and how it is computed.

    Args:
        kind: ``jsd`` (full-vocabulary generalized JSD), ``topk`` (on a top-k support), ``sampled_token`` (the
            sampled token's reverse-KL estimate as a stop-gradient advantage) or ``pointwise_clip`` (the JSD with
            each vocabulary entry's term clipped).
        beta: 0 forward KL(teacher || student), 1 reverse KL, in between the generalized JSD.
        temperature: divisor of both models' logits.
        top_k: support size of ``topk``.
        top_k_tail: ``topk`` adds a tail bucket instead of renormalising.
        top_k_support: whose top-k forms the support: ``teacher`` or ``student``.
        pointwise_clip: the per-entry ceiling of ``pointwise_clip``.
        implementation: ``auto`` (the closed form wherever it applies), ``closed_form`` (required: an error where
            it does not apply) or ``checkpointed`` (always the checkpointed path).
        fused: take each chunk's gradient in the forward pass on linear heads (backward then only scales it);
            off, backward recomputes each chunk (less memory held between the passes, more time).
        chunk_size: positions per chunk; None sizes chunks by ``chunk_mib``.
        chunk_mib: MiB of one float32 ``[positions, vocabulary]`` tensor of a chunk.
        ratio_clip: ``sampled_token``'s truncated importance ratio (the cap C); None: the ratio uncapped.
    """

    kind: LossKind = "jsd"
    beta: float = 0.0
    temperature: float = 1.0
    top_k: int = 32
    top_k_tail: bool = True
    top_k_support: Literal["teacher", "student"] = "teacher"
    pointwise_clip: float = 0.05
    implementation: Implementation = "auto"
    fused: bool = True
    chunk_size: int | None = None
    chunk_mib: float = 128.0
    ratio_clip: float | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.kind in ("jsd", "topk", "sampled_token", "pointwise_clip"), f"unknown loss kind {self.kind!r}"),
            (0.0 <= self.beta <= 1.0, f"beta must be in [0, 1], got {self.beta}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (self.top_k >= 1, f"top_k must be >= 1, got {self.top_k}"),
            (self.top_k_support in ("teacher", "student"), f"unknown top_k_support {self.top_k_support!r}"),
            (self.pointwise_clip > 0, f"pointwise_clip must be > 0, got {self.pointwise_clip}"),
            (
                self.implementation in ("auto", "checkpointed", "closed_form"),
                f"unknown implementation {self.implementation!r}",
            ),
            (
                self.implementation != "closed_form" or self.kind == "jsd",
                "implementation closed_form computes the jsd family only: use kind jsd, or implementation auto",
            ),
            (
                self.chunk_size is None or self.chunk_size >= 1,
                f"chunk_size must be >= 1 (or None to size chunks by chunk_mib), got {self.chunk_size}",
            ),
            (self.chunk_mib > 0, f"chunk_mib must be > 0, got {self.chunk_mib}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def chunk_rows(spec: LossSpec, vocab_size: int) -> int:
    """Positions per chunk: ``spec.chunk_size``, or as many as one float32 chunk of ``chunk_mib`` MiB holds."""
    if spec.chunk_size is not None:
        return spec.chunk_size
    return max(1, int(spec.chunk_mib * 2**20) // (4 * vocab_size))


def loss_function(spec: LossSpec) -> Callable[..., Tensor]:
    """``(student_logits, teacher_logits, *aux) -> [n]`` per-position losses of ``spec.kind``, through autograd."""
    if spec.kind == "jsd":
        return partial(generalized_jsd, beta=spec.beta, temperature=spec.temperature)
    if spec.kind == "topk":
        return partial(
            topk_divergence,
            k=spec.top_k,
            beta=spec.beta,
            temperature=spec.temperature,
            tail=spec.top_k_tail,
            support=spec.top_k_support,
        )
    if spec.kind == "pointwise_clip":
        return partial(
            pointwise_clipped_divergence, beta=spec.beta, temperature=spec.temperature, clip=spec.pointwise_clip
        )
    return partial(_sampled_token, temperature=spec.temperature, ratio_clip=spec.ratio_clip)


def _sampled_token(
    student_logits, teacher_logits, token_ids, behavior_logprobs, sampled, temperature: float, ratio_clip
) -> Tensor:
    student = token_logprobs(student_logits, token_ids, temperature)
    # A token no policy sampled (a rewrite's) has no behaviour log-prob: its importance ratio is one.
    behavior = torch.where(sampled, behavior_logprobs, student.detach())
    teacher = token_logprobs(teacher_logits, token_ids, temperature)
    return sampled_token_loss(student, teacher, behavior, ratio_clip)


def linear_weight(head) -> Tensor | None:
    """The weight of a bias-free ``nn.Linear`` output head held whole on this process, else None."""
    from torch.distributed.tensor import DTensor

    if not isinstance(head, torch.nn.Linear) or head.bias is not None or isinstance(head.weight, DTensor):
        return None
    return head.weight


def plan(spec: LossSpec, student_head, teacher_head) -> Path:
    """Which path computes the loss (see the module docstring): the one place that decides.

    Raises:
        ValueError: If ``spec.implementation`` is ``closed_form`` and a head is not a plain linear map.
    """
    linear = linear_weight(student_head) is not None and linear_weight(teacher_head) is not None
    if spec.implementation == "closed_form" and not linear:
        raise ValueError(
            "loss_implementation: closed_form needs bias-free linear output heads without logit soft-capping, "
            "held whole (not sharded): use loss_implementation: auto or checkpointed for these models."
        )
    if spec.implementation == "checkpointed" or not linear:
        return "checkpointed"
    if spec.kind == "jsd":
        return "closed_form"
    return "linear" if spec.fused else "checkpointed"


def token_losses(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    student_head,
    teacher_head,
    spec: LossSpec,
    token_ids: Tensor | None = None,
    behavior_logprobs: Tensor | None = None,
    sampled: Tensor | None = None,
) -> Tensor:
    """Per-position losses from hidden states, without holding more than a chunk of logits at once.

    Args:
        student_hidden: ``[N, H]`` student hidden states at the response positions (usually requiring grad).
        teacher_hidden: ``[N, H']`` teacher hidden states at the same positions.
        student_head: the student's output head, ``[n, H] -> [n, V]`` logits.
        teacher_head: the teacher's output head; it never receives gradient.
        spec: the loss and how to compute it.
        token_ids: ``[N]`` the rollout's tokens (``sampled_token`` only).
        behavior_logprobs: ``[N]`` their log-probs under the policy that sampled them (``sampled_token`` only).
        sampled: ``[N]`` bool, the positions some policy sampled (None: all); elsewhere ``behavior_logprobs`` is
            ignored and the importance ratio is one (``sampled_token`` only).

    Returns:
        ``[N]`` float32 losses, connected to the autograd graph of the student.

    Raises:
        ValueError: If ``sampled_token`` lacks its tokens, or ``closed_form`` cannot run on these heads.
    """
    aux: tuple[Tensor, ...] = ()
    if spec.kind == "sampled_token":
        if token_ids is None or behavior_logprobs is None:
            raise ValueError("the sampled_token loss needs token_ids and behavior_logprobs")
        if sampled is None:
            sampled = torch.ones_like(token_ids, dtype=torch.bool)
        aux = (token_ids, behavior_logprobs, sampled)
    path = plan(spec, student_head, teacher_head)
    if path == "checkpointed":
        rows = chunk_rows(spec, vocab_size(teacher_head, teacher_hidden))
        return chunked_token_loss(
            student_hidden, teacher_hidden, student_head, teacher_head, loss_function(spec), rows, *aux
        )
    student_weight, teacher_weight = linear_weight(student_head), linear_weight(teacher_head)
    if path == "closed_form":
        block_fn = partial(jsd_and_grad, beta=spec.beta, temperature=spec.temperature)
    else:
        block_fn = _autograd_block(loss_function(spec))
    rows = chunk_rows(spec, student_weight.shape[0])
    return linear_head_loss(
        student_hidden, teacher_hidden, student_weight, teacher_weight, block_fn, rows, spec.fused, aux
    )


def _autograd_block(loss_fn: Callable[..., Tensor]):
    """A ``linear.BlockFn`` from a loss on logits: the gradient of each block by autograd, in the forward pass."""

    def block(student_logits: Tensor, teacher_logits: Tensor, *aux: Tensor, with_grad: bool):
        if not with_grad:
            return loss_fn(student_logits, teacher_logits, *aux), None
        with torch.enable_grad():
            logits = student_logits.detach().requires_grad_()
            values = loss_fn(logits, teacher_logits, *aux)
            (grad,) = torch.autograd.grad(values.sum(), logits)
        return values.detach(), grad

    return block


def vocab_size(head, hidden: Tensor) -> int:
    """The head's output size: its ``out_features``, or the width of its output on zero rows."""
    size = getattr(head, "out_features", None)
    if size is None:
        with torch.no_grad():
            size = head(hidden[:0]).shape[-1]
    return int(size)
