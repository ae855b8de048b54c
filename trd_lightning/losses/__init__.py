"""Distillation losses: pure functions on tensors, one divergence convention (see ``divergence``)."""

from trd_lightning.losses.baselines import (
    kl_token_clip,
    near_future_weights,
    persistent_divergence_mask,
    pointwise_clipped_divergence,
    topd_token_loss,
    topk_reverse_kl,
)
from trd_lightning.losses.chunked import chunked_token_loss
from trd_lightning.losses.closed_form import closed_form_forward_kl
from trd_lightning.losses.divergence import (
    divergence_from_logprobs,
    generalized_jsd,
    masked_divergence,
    sampled_token_loss,
    token_logprobs,
    topk_divergence,
)
from trd_lightning.losses.served import served_token_statistics, served_topk_divergence

__all__ = [
    "chunked_token_loss",
    "closed_form_forward_kl",
    "divergence_from_logprobs",
    "generalized_jsd",
    "kl_token_clip",
    "masked_divergence",
    "near_future_weights",
    "persistent_divergence_mask",
    "pointwise_clipped_divergence",
    "sampled_token_loss",
    "served_token_statistics",
    "served_topk_divergence",
    "token_logprobs",
    "topd_token_loss",
    "topk_divergence",
    "topk_reverse_kl",
]
