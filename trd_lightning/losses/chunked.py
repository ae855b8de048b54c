"""The memory-bounded driver: per-token losses from hidden states, one chunk of positions at a time."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


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
        raise ValueError(f"student_hidden has {n} rows but teacher_hidden has {teacher_hidden.shape[0]}")
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
