"""Per-row losses of two bias-free linear output heads, chunk by chunk, with the gradient taken in the same pass.

A chunk is as many positions as the memory budget allows; its two ``[rows, V]`` logit tensors are written into
buffers allocated once per call (a fresh large tensor costs page faults on every chunk). The per-position
arithmetic (a ``block_fn``, e.g. ``closed_form.jsd_and_grad``) then runs on blocks of a few rows, so that its
temporaries stay in the CPU's cache: the vocabulary passes run at cache speed, and the matmuls on whole chunks.

``fused`` (the default): forward also computes each chunk's gradient with respect to the student's logits and
projects it at once (``grad_logits @ W`` for the hidden states, ``grad_logits.T @ h`` summed into one weight
gradient), so backward recomputes nothing. Backward scales the stored gradients by the upstream gradient: exactly
for the hidden states (row by row), and for the weight by the upstream value most rows share, recomputing only
the rows whose upstream differs from it (none in a plain sum; the clipped tokens under a token clip). The cost is
one ``[V, H]`` weight gradient and one ``[N, H]`` hidden gradient held from forward to backward.

Not fused: forward computes values only, and backward recomputes each chunk's logits and gradient (rows with a
zero upstream gradient are skipped). Less memory between the passes; twice the head projections.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

# Rows per block of per-position arithmetic on CPU: about 512 KiB per float32 [rows, V] temporary (a core's L2
# cache on the development machine), so that the handful a block makes stay in the cache; at 151,936 entries,
# blocks of 6 rows instead of 1 took 2.5 times as long there. Other devices run whole chunks (one kernel each).
_BLOCK_ENTRIES = 2**17

BlockFn = Callable[..., tuple[Tensor, Tensor | None]]


def _project(hidden: Tensor, weight: Tensor, out: Tensor) -> Tensor:
    """``hidden @ weight.T`` into the float32 buffer ``out``."""
    if hidden.dtype == weight.dtype == torch.float32:
        return torch.mm(hidden, weight.T, out=out)
    return out.copy_(hidden @ weight.T)


def _chunk_pass(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    student_weight: Tensor,
    teacher_weight: Tensor,
    block_fn: BlockFn,
    rows: int,
    aux: Sequence[Tensor],
    on_grad: Callable[[slice, Tensor], None] | None,
) -> Tensor:
    """Every row's loss; with ``on_grad``, also ``on_grad(chunk_rows, grad_logits)`` once per chunk."""
    n, vocab = student_hidden.shape[0], student_weight.shape[0]
    size = min(rows, n)
    device = student_hidden.device
    s_buffer = torch.empty(size, vocab, dtype=torch.float32, device=device)
    t_buffer = torch.empty(size, vocab, dtype=torch.float32, device=device)
    block = max(1, min(size, _BLOCK_ENTRIES // vocab)) if device.type == "cpu" else max(size, 1)
    out = torch.empty(n, dtype=torch.float32, device=device)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        s_logits = _project(student_hidden[start:stop], student_weight, s_buffer[: stop - start])
        t_logits = _project(teacher_hidden[start:stop], teacher_weight, t_buffer[: stop - start])
        for first in range(0, stop - start, block):
            part = slice(first, first + block)
            at = slice(start + first, min(start + first + block, stop))
            loss, grad = block_fn(s_logits[part], t_logits[part], *(a[at] for a in aux), with_grad=on_grad is not None)
            out[at] = loss
            if grad is not None:
                s_logits[part] = grad  # the buffer now holds the chunk's gradient with respect to its logits
        if on_grad is not None:
            on_grad(slice(start, stop), s_logits)
    return out


class _LinearHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, block_fn, rows, fused, *aux):
        # needs_input_grad follows requires_grad even under no_grad: the caller passes fused=False there.
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.fused = fused and (need_hidden or need_weight)
        ctx.block_fn, ctx.rows = block_fn, rows
        ctx.save_for_backward(student_hidden, student_weight, teacher_hidden, teacher_weight, *aux)
        if not ctx.fused:
            return _chunk_pass(
                student_hidden, teacher_hidden, student_weight, teacher_weight, block_fn, rows, aux, None
            )
        ctx.grad_hidden = torch.empty_like(student_hidden) if need_hidden else None
        ctx.grad_weight = torch.zeros_like(student_weight) if need_weight else None

        def project(chunk: slice, grad_logits: Tensor) -> None:
            grad_logits = grad_logits.to(student_weight.dtype)
            if need_hidden:
                torch.mm(grad_logits, student_weight, out=ctx.grad_hidden[chunk])
            if need_weight:
                ctx.grad_weight.addmm_(grad_logits.T, student_hidden[chunk])

        return _chunk_pass(student_hidden, teacher_hidden, student_weight, teacher_weight, block_fn, rows, aux, project)

    @staticmethod
    def backward(ctx, grad: Tensor):
        student_hidden, student_weight, teacher_hidden, teacher_weight, *aux = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = grad_weight = None
        stored = ctx.fused and grad.numel() > 0
        # A second backward (retain_graph) finds the stored weight gradient consumed: it recomputes every row.
        weight_stored = stored and need_weight and ctx.grad_weight is not None
        if stored and need_hidden:
            grad_hidden = ctx.grad_hidden * grad[:, None].to(ctx.grad_hidden.dtype)
        elif need_hidden:
            grad_hidden = torch.zeros_like(student_hidden)
        if weight_stored:
            # The weight gradient is linear in the rows' upstream values: the value most rows share scales the
            # stored sum; the rows that differ from it are recomputed for the difference.
            common = grad.mode().values
            grad_weight = ctx.grad_weight.mul_(common.to(ctx.grad_weight.dtype))
            ctx.grad_weight = None
        else:
            common = grad.new_zeros(())
            if need_weight:
                grad_weight = torch.zeros_like(student_weight)
        redo_hidden = need_hidden and not stored
        redo = (grad != common).nonzero().squeeze(1) if (need_weight or redo_hidden) else grad.new_zeros(0).long()
        if redo.numel() == 0:
            return grad_hidden, grad_weight, None, None, None, None, None, *(None for _ in aux)
        hidden = student_hidden[redo]
        delta = (grad[redo] - common)[:, None]

        def apply(chunk: slice, grad_logits: Tensor) -> None:
            grad_logits = grad_logits.to(student_weight.dtype)
            if redo_hidden:
                grad_hidden[redo[chunk]] = (grad_logits @ student_weight) * delta[chunk].to(grad_hidden.dtype)
            if need_weight:
                grad_weight.addmm_(grad_logits.T, hidden[chunk] * delta[chunk].to(hidden.dtype))

        _chunk_pass(
            hidden,
            teacher_hidden[redo],
            student_weight,
            teacher_weight,
            ctx.block_fn,
            ctx.rows,
            [a[redo] for a in aux],
            apply,
        )
        return grad_hidden, grad_weight, None, None, None, None, None, *(None for _ in aux)


def linear_head_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    student_weight: Tensor,
    teacher_weight: Tensor,
    block_fn: BlockFn,
    rows: int,
    fused: bool = True,
    aux: Sequence[Tensor] = (),
) -> Tensor:
    """Per-row losses of the logits ``hidden @ weight.T`` of two models, ``rows`` positions per chunk.

    Args:
        student_hidden: ``[N, H]`` student hidden states (usually requiring grad).
        teacher_hidden: ``[N, H']`` teacher hidden states; never receives gradient.
        student_weight: ``[V, H]`` student output-head weight.
        teacher_weight: ``[V, H']`` teacher output-head weight; never receives gradient.
        block_fn: ``(student_logits [n, V], teacher_logits [n, V], *aux_rows, with_grad) -> (values [n],
            gradient of their sum with respect to student_logits [n, V], or None without with_grad)``; values
            must depend on their own row only.
        rows: positions per chunk (>= 1).
        fused: take the gradient in the forward pass (see the module docstring).
        aux: extra ``[N, ...]`` tensors, sliced with the rows and passed to ``block_fn``.

    Returns:
        ``[N]`` float32 losses, connected to the autograd graph through the student's hidden states and weight.

    Raises:
        ValueError: If ``rows < 1`` or the row counts differ.
    """
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    n = student_hidden.shape[0]
    for name, t in (("teacher_hidden", teacher_hidden), *((f"aux[{i}]", a) for i, a in enumerate(aux))):
        if t.shape[0] != n:
            raise ValueError(f"student_hidden has {n} rows but {name} has {t.shape[0]}")
    fused = fused and torch.is_grad_enabled()
    return _LinearHeadLoss.apply(
        student_hidden, student_weight, teacher_hidden.detach(), teacher_weight.detach(), block_fn, rows, fused, *aux
    )
