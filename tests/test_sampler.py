"""The resumable sampler (``trd_lightning.data.sampler``): an epoch that starts part-way, per replica."""

from __future__ import annotations

import torch

from trd_lightning.data.sampler import ResumableSampler


def shuffled(n: int, seed: int) -> list[int]:
    """DistributedSampler's epoch-0 order: a permutation from a generator seeded with seed + epoch."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def test_resumable_sampler_skips_once():
    data = list(range(10))
    full = shuffled(10, seed=3)
    assert full != data  # a shuffle that happens to be the identity would hide an ignored order
    sampler = ResumableSampler(data, num_replicas=1, rank=0, shuffle=True, seed=3)
    sampler.skip = 4
    assert list(sampler) == full[4:]
    assert list(sampler) == full  # the skip applies to the resumed epoch only


def test_resumable_sampler_without_skip_is_the_full_order():
    sampler = ResumableSampler(list(range(10)), num_replicas=1, rank=0, shuffle=True, seed=3)
    assert list(sampler) == shuffled(10, seed=3)


def test_resumable_sampler_replicas_partition_the_dataset():
    data = list(range(10))
    parts = [list(ResumableSampler(data, num_replicas=2, rank=r, shuffle=True, seed=5)) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == 5
    assert set(parts[0]).isdisjoint(parts[1])
    assert sorted(parts[0] + parts[1]) == data


def test_resumable_sampler_skip_is_per_replica():
    data = list(range(10))
    whole = list(ResumableSampler(data, num_replicas=2, rank=1, shuffle=True, seed=5))
    sampler = ResumableSampler(data, num_replicas=2, rank=1, shuffle=True, seed=5)
    sampler.skip = 2
    assert list(sampler) == whole[2:]
