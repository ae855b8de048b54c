"""Tests for trd_lightning.metrics against exact binomial references and hand-worked values."""

from __future__ import annotations

import math
import random
import time
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trd_lightning.metrics import AvgAtK, PassAtK, pass_at_k


def reference_pass_at_k(n: int, c: int, k: int) -> float:
    # The definition itself, in exact rationals: math.comb(n - c, k) is 0 when n - c < k, which gives 1.
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def random_triples(count: int, seed: int = 0) -> list[tuple[int, int, int]]:
    rng = random.Random(seed)
    triples = []
    for _ in range(count):
        n = rng.randint(1, 50)
        triples.append((n, rng.randint(0, n), rng.randint(1, n)))
    # The edges by construction: no hit, all hits, and fewer misses than k.
    triples += [(n, 0, k) for n in (1, 7, 50) for k in (1, n)]
    triples += [(n, n, k) for n in (1, 7, 50) for k in (1, n)]
    triples += [(50, 48, 3), (10, 9, 2), (5, 1, 5)]
    return triples


def rows_with_hits(n: int, hits: list[int], seed: int = 0) -> torch.Tensor:
    """A [len(hits), n] 0/1 tensor whose row i holds hits[i] ones at random places."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.zeros(len(hits), n)
    for i, c in enumerate(hits):
        rows[i, torch.randperm(n, generator=generator)[:c]] = 1
    return rows


def test_pass_at_k_matches_binomial_formula():
    triples = random_triples(2000)
    assert any(n - c < k for n, c, k in triples) and any(n - c >= k for n, c, k in triples)
    for n, c, k in triples:
        assert math.isclose(pass_at_k(n, c, k), reference_pass_at_k(n, c, k), rel_tol=1e-12, abs_tol=1e-14), (n, c, k)


def test_pass_at_k_hand_values():
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6, abs=1e-15)  # 1 - C(2,2)/C(4,2) = 1 - 1/6
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-15)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 6, 5) == 1.0  # 4 misses cannot fill 5 draws


@pytest.mark.parametrize(("n", "c", "k"), [(3, 1, 4), (3, 1, 0), (3, 4, 1), (3, -1, 1)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_pass_at_k_metric_matches_reference():
    rng = random.Random(1)
    for k in (1, 2, 5, 16):
        n = 16
        hits = [rng.randint(0, n) for _ in range(40)] + [0, n, n - k + 1]
        metric = PassAtK(k)
        metric.update(rows_with_hits(n, hits).bool())
        expected = sum(reference_pass_at_k(n, c, k) for c in hits) / len(hits)
        assert metric.compute().item() == pytest.approx(expected, rel=1e-12, abs=1e-14)


def test_pass_at_k_metric_needs_k_samples():
    with pytest.raises(ValueError, match=r"k=3.*n=2"):
        PassAtK(3).update(torch.ones(4, 2))
    with pytest.raises(ValueError):
        PassAtK(0)


def test_avg_at_k_hand_values():
    metric = AvgAtK()
    metric.update(torch.tensor([[1, 0, 1, 1], [0, 0, 0, 1]]))  # 3/4 and 1/4
    assert metric.compute().item() == pytest.approx(0.5, abs=1e-15)
    metric = AvgAtK()
    metric.update(torch.tensor([[True, True, True]]))
    assert metric.compute().item() == 1.0


def test_avg_at_k_rejects_bad_input():
    with pytest.raises(ValueError):
        AvgAtK().update(torch.ones(4))
    with pytest.raises(ValueError):
        AvgAtK().update(torch.tensor([[0.0, 2.0]]))


def test_pass_at_1_is_the_mean_accuracy():
    correct = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 1]])
    metric = PassAtK(1)
    metric.update(correct)
    assert metric.compute().item() == pytest.approx(0.5, abs=1e-15)
    rows = rows_with_hits(8, [0, 3, 8, 5, 1], seed=2)
    metric = PassAtK(1)
    metric.update(rows)
    assert metric.compute().item() == pytest.approx((0 + 3 + 8 + 5 + 1) / 40, abs=1e-15)


def test_updates_accumulate():
    avg = AvgAtK()
    avg.update(torch.tensor([[1, 1]]))  # 1
    avg.update(torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]))  # 1/4 and 0
    # Every prompt weighs the same, whatever its k: (1 + 1/4 + 0) / 3, not 3 correct / 10 samples.
    assert avg.compute().item() == pytest.approx(1.25 / 3, abs=1e-15)
    pass2 = PassAtK(2)
    pass2.update(rows_with_hits(4, [2]))  # 5/6
    pass2.update(rows_with_hits(3, [0, 1]))  # 0 and 1 - C(2,2)/C(3,2) = 2/3
    assert pass2.compute().item() == pytest.approx((5 / 6 + 0 + 2 / 3) / 3, abs=1e-15)


# Ten prompts of eight samples; two "ranks" take unequal shares.
HITS = [0, 1, 2, 8, 5, 7, 3, 0, 6, 4]
SPLIT = 3


def expected_values(k: int) -> tuple[float, float]:
    avg = sum(c / 8 for c in HITS) / len(HITS)
    return avg, sum(reference_pass_at_k(8, c, k) for c in HITS) / len(HITS)


def test_merged_states_equal_one_process():
    rows = rows_with_hits(8, HITS)
    for make in (AvgAtK, lambda: PassAtK(3)):
        whole, part_a, part_b = make(), make(), make()
        whole.update(rows)
        part_a.update(rows[:SPLIT])
        part_b.update(rows[SPLIT:])
        part_a.merge_state(part_b)
        assert part_a.compute().item() == pytest.approx(whole.compute().item(), abs=1e-15)
    avg, pass3 = expected_values(3)
    assert whole.compute().item() == pytest.approx(pass3, abs=1e-14)


def _rank_main(rank: int, world_size: int, rendezvous: str, results: str) -> None:
    try:
        dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world_size)
    except Exception as error:  # reported to the parent, which skips: no gloo here is not a metric bug
        Path(f"{results}{rank}.err").write_text(repr(error))
        return
    try:
        rows = rows_with_hits(8, HITS)
        mine = rows[:SPLIT] if rank == 0 else rows[SPLIT:]
        avg, pass3 = AvgAtK(), PassAtK(3)
        avg.update(mine)
        pass3.update(mine)
        torch.save({"avg": avg.compute().item(), "pass": pass3.compute().item()}, f"{results}{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_sync(tmp_path):
    """compute() on each of two real gloo ranks, each with part of the prompts, equals the one-process value."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("needs the fork start method")
    # fork, not spawn: a spawned rank re-imports the package (transformers, lightning), over 20 s on two cores.
    args = (2, f"file://{tmp_path / 'rendezvous'}", str(tmp_path / "rank"))
    ranks = mp.start_processes(_rank_main, args=args, nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 60
    while not ranks.join(timeout=1):  # raises if a rank raised
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail("the two ranks did not finish within 60 s")
    errors = sorted(tmp_path.glob("rank*.err"))
    if errors:
        pytest.skip(f"gloo init failed on this machine: {errors[0].read_text()}")
    avg, pass3 = expected_values(3)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["avg"] == pytest.approx(avg, abs=1e-14)
        assert got["pass"] == pytest.approx(pass3, abs=1e-14)
