"""The objective on a produced batch: token-level options against hand rules, and the micro-batch formation."""

from __future__ import annotations

from dataclasses import replace

import torch
from helpers import KeepBatch

from trd_lightning.objective import micro_batches
from trd_lightning.rollout.batch import Prompts, Rollouts, Sequences


def test_token_level_baselines_as_module_loss_options(make_run, tiny, tmp_path):
    """Loss truncation, the per-entry clip and TOPD weighting applied in the module, against hand rules."""
    keep = KeepBatch()
    trainer, module, dm = make_run(callbacks=[keep], max_steps=1)
    trainer.fit(module, dm)
    seqs = keep.batches[0].produced.train
    base_objective = module.objective

    def losses(spec: dict | None = None, **changes):
        objective = replace(base_objective, spec=replace(base_objective.spec, **(spec or {})), **changes)
        return objective.token_losses(module.student, module.scorer, seqs)

    with torch.no_grad():
        base = losses()
        clip = float(base.median())
        assert torch.allclose(losses(token_clip=clip), base.clamp(max=clip))
        # above every entry: the plain divergence
        assert torch.allclose(losses({"kind": "pointwise_clip", "pointwise_clip": 1e6}), base, atol=1e-6)
        # each of V entries is at most 1e-4
        clipped = losses({"kind": "pointwise_clip", "pointwise_clip": 1e-4})
        assert bool((clipped <= 1e-4 * len(dm.tokenizer) + 1e-6).all())
        threshold, window, discount = float(base.quantile(0.7)), 2, 0.5
        got = losses(topd=True, topd_threshold=threshold, topd_window=window, topd_discount=discount)
    # Brute force, row by row: a token is divergent if above the threshold and the mean of the next `window`
    # tokens of its row is too; each divergent t adds discount**(s - t) to the weight of s in [t, t + window].
    expected, start = [], 0
    for row in seqs.response_mask:
        values = base[start : start + int(row.sum())].tolist()
        start += len(values)
        weights = [0.0] * len(values)
        for t, v in enumerate(values):
            future = values[t + 1 : t + 1 + window]
            if v > threshold and future and sum(future) / len(future) > threshold:
                for s in range(t, min(t + window + 1, len(values))):
                    weights[s] += discount ** (s - t)
        expected += [v * w for v, w in zip(values, weights)]
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)


def sequences_of_lengths(prompt_lengths: list[int], response_lengths: list[int]) -> Sequences:
    prompts = Prompts.from_lists([[7] * n for n in prompt_lengths], 0)
    width = max(response_lengths)
    mask = torch.arange(width)[None, :] < torch.tensor(response_lengths)[:, None]
    response = Rollouts(mask.long() * 5, mask, torch.zeros(len(mask), dtype=torch.bool), torch.zeros(mask.shape))
    return Sequences.build(prompts, prompts, response, torch.ones(len(mask), dtype=torch.bool))


def test_micro_batches_by_rows_are_consecutive():
    seqs = sequences_of_lengths([2] * 5, [1] * 5)
    assert micro_batches(seqs, rows=2) == [[0, 1], [2, 3], [4]]


def test_micro_batches_by_tokens_pack_rows_of_similar_length_by_hand():
    # Total lengths 3+9, 2+2, 3+8, 2+1, 1+20: sorted longest first 4 (21), 0 (12), 2 (11), 1 (4), 3 (3).
    seqs = sequences_of_lengths([3, 2, 3, 2, 1], [9, 2, 8, 1, 20])
    # Budget 24: row 4 alone (21; 2 rows would be 2 x 23); rows 0 and 2 (2 x (3 + 9) = 24); rows 1 and 3 (2 x 4).
    assert micro_batches(seqs, rows=1, tokens=24) == [[4], [0, 2], [1, 3]]
    # Budget 8: rows over it sit alone; rows 1 and 3 fit together (2 x (2 + 2) = 8).
    assert micro_batches(seqs, rows=1, tokens=8) == [[4], [0], [2], [1, 3]]
