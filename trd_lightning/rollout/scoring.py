"""Log-probabilities a model gives to the tokens of given responses, without its full logits."""

from __future__ import annotations

import torch
from torch import nn

from trd_lightning.hf import last_hidden, output_head
from trd_lightning.losses import token_logprobs
from trd_lightning.rollout.assemble import response_rows


@torch.no_grad()
def response_logprobs(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """[B, L] log-probs of ``response_ids`` under ``model`` given ``ids`` (context + response); 0 off the mask.

    The response occupies the last L columns of ``ids`` (left-padded context, right-padded response).
    """
    response_mask = response_mask.bool()
    rows = response_rows(last_hidden(model, ids, mask), ids.shape[1] - response_mask.shape[1], response_mask)
    head = output_head(model)
    targets = response_ids[response_mask]
    values = [
        token_logprobs(head(rows[i : i + chunk_size]), targets[i : i + chunk_size])
        for i in range(0, rows.shape[0], chunk_size)
    ]
    out = torch.zeros(response_mask.shape, dtype=torch.float32, device=ids.device)
    if values:
        out[response_mask] = torch.cat(values)
    return out
