"""The sampled-token loss's truncated importance ratio (TIS), against a float64 hand formula: value -(A * min(r, C)),
gradient in the student's log-prob -A * min(r, C); uncapped it is the plain estimator."""

from __future__ import annotations

import pytest
import torch

from trd_lightning.losses import sampled_token_loss


@pytest.mark.parametrize("clip", [None, 2.0, 0.5])
def test_the_capped_ratio_weights_the_gradient(clip):
    torch.manual_seed(0)
    student = torch.randn(64).mul(0.5).sub(2.0).requires_grad_()
    teacher, behavior = torch.randn(64).sub(2.0), torch.randn(64).mul(0.5).sub(2.0)
    loss = sampled_token_loss(student, teacher, behavior, clip)
    loss.sum().backward()
    s, t, b = (x.detach().double() for x in (student, teacher, behavior))
    advantage, ratio = -(s - t), torch.exp(s - b)
    weight = ratio if clip is None else ratio.clamp(max=clip)
    torch.testing.assert_close(loss.double(), -(advantage * weight), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(student.grad.double(), -(advantage * weight), rtol=1e-6, atol=1e-6)
    if clip is not None:
        assert (ratio > clip).any() and (ratio < clip).any()  # both sides of the cap are exercised
