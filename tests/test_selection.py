"""Which rollouts TRD refines: the plan's modes, the per-rollout draws, and the divergence that marks a rollout."""

from __future__ import annotations

import math

import pytest
import torch

from trd_lightning.diagnostics import first_divergence
from trd_lightning.rollout.seeds import derive_seed, row_seeds, uniforms
from trd_lightning.rollout.selection import RefinementPlan, select_for_refinement


def test_selection_modes_pick_the_rollouts_they_should():
    draws = torch.tensor([0.1, 0.5, 0.9, 0.3])
    correct = [True, False, True, False]
    divergent = [False, False, True, True]
    assert select_for_refinement(RefinementPlan(1.0), draws) == [True] * 4
    assert select_for_refinement(RefinementPlan(0.0), draws) == [False] * 4
    assert select_for_refinement(RefinementPlan(0.4), draws) == [True, False, False, True]  # draws below 0.4
    assert select_for_refinement(RefinementPlan(1.0, "incorrect"), draws, correct=correct) == [False, True, False, True]
    assert select_for_refinement(RefinementPlan(1.0, "divergent"), draws, divergent=divergent) == [
        False,
        False,
        True,
        True,
    ]
    assert select_for_refinement(RefinementPlan(0.4, "incorrect"), draws, correct=correct) == [False] * 3 + [True]
    with pytest.raises(ValueError, match="answer_column"):
        select_for_refinement(RefinementPlan(1.0, "incorrect"), draws)
    with pytest.raises(ValueError, match="teacher's log-probs"):
        select_for_refinement(RefinementPlan(1.0, "divergent"), draws)


def test_per_rollout_draws_select_the_planned_share():
    draws = uniforms(row_seeds(0, 7, "select", range(20_000)), 1)[:, 0]
    chosen = select_for_refinement(RefinementPlan(0.3), draws)
    assert abs(sum(chosen) / 20_000 - 0.3) < 0.02


def test_bad_plans_are_refused():
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        RefinementPlan(1.5)
    with pytest.raises(ValueError, match="Unknown refinement mode"):
        RefinementPlan(1.0, "wrong")


def test_first_divergence_is_found_at_the_planted_position():
    lp = torch.full((3, 6), math.log(0.9))
    lp[0, 3] = math.log(0.01)  # planted
    lp[1, 5] = math.log(0.01)  # beyond the mask: not a divergence
    mask = torch.tensor([[1] * 6, [1] * 5 + [0], [1] * 6]).bool()
    assert first_divergence(lp, mask, math.log(0.05)).tolist() == [3, -1, -1]


def test_seeds_depend_on_what_a_row_is_not_where_it_is():
    assert row_seeds(0, 3, "rollout", [5, 9], 2) == [derive_seed(0, 3, "rollout", i, g) for i in (5, 9) for g in (0, 1)]
    seeds = {derive_seed(s, t, p, i) for s in (0, 1) for t in (0, 1) for p in ("rollout", "refine") for i in (0, 1)}
    assert len(seeds) == 16  # every input changes the seed
    assert all(0 <= x < 2**63 for x in seeds)
    first, again = uniforms([11, 12], 5), uniforms([12], 5)
    assert torch.equal(first[1], again[0])  # a row's numbers come from its seed alone
