"""Building the student and teacher sequences of a distillation batch.

Every prompt matrix is left-padded and every response matrix right-padded, so in ``prompt + response`` the
response always starts at column ``prompt width``: response token ``j`` is predicted by the hidden state at
column ``width - 1 + j`` on both sides, whatever the two contexts are.
"""

from __future__ import annotations

import torch


def pad_left(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into ``ids`` and ``mask`` matrices."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def concat_left_padded(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompt + response`` ids and attention mask (pad after a response's end is masked out)."""
    ids = torch.cat([prompt_ids, response_ids.to(prompt_ids.dtype)], dim=1)
    mask = torch.cat([prompt_mask, response_mask.to(prompt_mask.dtype)], dim=1)
    return ids, mask


def response_rows(hidden: torch.Tensor, prompt_width: int, response_mask: torch.Tensor) -> torch.Tensor:
    """The hidden states that predict the response tokens, one row per response token, in batch order.

    Args:
        hidden: [B, P + L, H] hidden states of ``prompt + response`` sequences.
        prompt_width: P, the (left-padded) prompt width.
        response_mask: [B, L] True on response tokens.
    """
    length = response_mask.shape[1]
    return hidden[:, prompt_width - 1 : prompt_width - 1 + length][response_mask.bool()]


def pad_right(t: torch.Tensor, width: int, value) -> torch.Tensor:
    """Right-pad the last dimension of ``t`` to ``width`` with ``value``."""
    if t.shape[-1] >= width:
        return t
    return torch.nn.functional.pad(t, (0, width - t.shape[-1]), value=value)


def replace_rows(base: torch.Tensor, new: torch.Tensor, rows: list[int], pad_value) -> torch.Tensor:
    """``base`` with ``rows`` replaced by the rows of ``new``, both right-padded to a common width."""
    width = max(base.shape[-1], new.shape[-1])
    out = pad_right(base, width, pad_value).clone()
    out[rows] = pad_right(new, width, pad_value).to(out.dtype)
    return out


def unpad_left(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """The token id lists of a left-padded matrix."""
    return [row[m.bool()].tolist() for row, m in zip(ids, mask)]
