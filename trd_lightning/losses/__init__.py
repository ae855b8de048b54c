"""Distillation losses: pure functions on tensors, one divergence convention (see ``divergence``).

``token_losses`` with a ``LossSpec`` is the entry point from hidden states; ``plan`` is where the path is chosen.
"""

from trd_lightning.losses.baselines import (
    kl_token_clip,
    near_future_weights,
    persistent_divergence_mask,
    pointwise_clipped_divergence,
    topd_token_loss,
    topk_reverse_kl,
)
from trd_lightning.losses.chunked import chunked_token_loss
from trd_lightning.losses.closed_form import jsd_and_grad
from trd_lightning.losses.divergence import (
    divergence_from_logprobs,
    generalized_jsd,
    kl_terms,
    masked_divergence,
    sampled_token_loss,
    token_logprobs,
    topk_divergence,
)
from trd_lightning.losses.entry import (
    LossKind,
    LossSpec,
    chunk_rows,
    linear_weight,
    loss_function,
    plan,
    token_losses,
    vocab_size,
)
from trd_lightning.losses.linear import linear_head_loss
from trd_lightning.losses.served import served_token_statistics, served_topk_divergence

__all__ = [
    "LossKind",
    "LossSpec",
    "chunk_rows",
    "chunked_token_loss",
    "divergence_from_logprobs",
    "generalized_jsd",
    "jsd_and_grad",
    "kl_terms",
    "kl_token_clip",
    "linear_head_loss",
    "linear_weight",
    "loss_function",
    "masked_divergence",
    "near_future_weights",
    "persistent_divergence_mask",
    "plan",
    "pointwise_clipped_divergence",
    "sampled_token_loss",
    "served_token_statistics",
    "served_topk_divergence",
    "token_logprobs",
    "token_losses",
    "topd_token_loss",
    "topk_divergence",
    "topk_reverse_kl",
    "vocab_size",
]
