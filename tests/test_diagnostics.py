"""Prefix-failure measurements (``trd_lightning.diagnostics``): the pure formulas against hand-worked values."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from trd_lightning.diagnostics import (
    STAT_COLUMNS,
    first_divergence,
    gradient_agreement,
    prefix_stats,
    token_distribution_stats,
)


# ------------------------------------------------------------------ pure formulas
def test_identical_gradients_agree_fully():
    g = torch.tensor([0.3, -1.0, 2.0])
    assert gradient_agreement(torch.stack([g, g])) == pytest.approx((1.0, 1.0))


def test_opposite_gradients_give_minus_one_and_cancel():
    g = torch.tensor([0.3, -1.0, 2.0])
    assert gradient_agreement(torch.stack([g, -g])) == pytest.approx((-1.0, 0.0))


def test_orthogonal_gradients_of_equal_norm_have_coherence_one_over_k():
    assert gradient_agreement(torch.eye(4) * 3.0) == pytest.approx((0.0, 0.25))


def test_gradient_agreement_matches_a_loop_in_float64():
    g = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    rows = g.double().tolist()

    def dot(a, b):
        return sum(x * y for x, y in zip(a, b))

    cosines = [dot(a, b) / math.sqrt(dot(a, a) * dot(b, b)) for a, b in itertools.permutations(rows, 2)]
    total = [sum(col) for col in zip(*rows)]
    coherence = dot(total, total) / (len(rows) * sum(dot(r, r) for r in rows))
    assert gradient_agreement(g) == pytest.approx((sum(cosines) / len(cosines), coherence), rel=1e-6)


def test_token_statistics_on_constructed_distributions():
    teacher_p = torch.tensor([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05]])
    student_p = torch.tensor([[0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]])
    tokens = torch.tensor([2, 0])
    stats = token_distribution_stats(student_p.log(), teacher_p.log(), tokens)
    for row, (tp, sp) in enumerate(zip(teacher_p.tolist(), student_p.tolist())):
        kl = sum(t * math.log(t / s) for t, s in zip(tp, sp))
        entropy = -sum(t * math.log(t) for t in tp)
        top = sorted(tp, reverse=True)
        expected = [kl, entropy, top[0], top[1], math.log(tp[tokens[row]])]
        assert stats[row].tolist() == pytest.approx(expected, rel=1e-5)
    assert STAT_COLUMNS[3] == "teacher_top2"


def test_prefix_stats_bimodal_share_and_kl_around_a_planted_divergence():
    # Row 0 diverges at position 2 of 4; row 1 (3 tokens) never diverges.
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    logprob = torch.tensor([[-0.1, -0.2, -5.0, -0.1], [-0.1, -0.1, -0.1, 0.0]])
    stats = {
        "kl": torch.tensor([[0.1, 0.3, 2.0, 4.0], [0.5, 0.5, 0.5, 9.0]]),
        "teacher_entropy": torch.tensor([[1.0, 1.0, 2.0, 2.0], [0.0, 0.0, 0.0, 9.0]]),
        "teacher_top2": torch.tensor([[0.1, 0.25, 0.4, 0.1], [0.3, 0.0, 0.0, 0.9]]),
    }
    first = first_divergence(logprob, mask, math.log(0.05))
    assert first.tolist() == [2, -1]
    out = prefix_stats(stats, mask, first, tau=0.2)
    assert out["bimodal_frac"] == pytest.approx(3 / 7)  # 0.25, 0.4 and 0.3 exceed 0.2; position (1, 3) is off
    assert out["entropy"] == pytest.approx(6 / 7)
    assert out["diverged_frac"] == pytest.approx(0.5)
    assert out["first_divergence"] == pytest.approx(2 / 4)
    assert out["kl_before"] == pytest.approx(0.2)
    assert out["kl_after"] == pytest.approx(3.0)
