"""How a token is drawn: the filtered distribution against a hand computation, the inverse-CDF draw, end tokens."""

from __future__ import annotations

import pytest
import torch

from trd_lightning.rollout.sampling import SamplingConfig, cut_at_eos, draw, filtered_logprobs

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def target(temperature: float, top_k: int = 0, top_p: float = 1.0) -> list[float]:
    """The distribution by hand: softmax(logits / T), then the k most likely, then the smallest top-p prefix."""
    weights = [float(torch.tensor(v / temperature).exp()) for v in LOGITS.tolist()]
    order = sorted(range(len(weights)), key=lambda i: -weights[i])
    keep = order[:top_k] if top_k else order
    total = sum(weights[i] for i in keep)
    kept, mass = [], 0.0
    for i in keep:
        if mass >= top_p:
            break
        kept.append(i)
        mass += weights[i] / total
    z = sum(weights[i] for i in kept)
    return [weights[i] / z if i in kept else 0.0 for i in range(len(weights))]


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 3, 1.0), (1.3, 0, 0.8)]
)
def test_draws_follow_the_filtered_distribution(temperature, top_k, top_p):
    n = 200_000
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    logprobs = filtered_logprobs(LOGITS.expand(n, -1).clone(), sampling)
    u = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tokens, chosen = draw(logprobs, u)
    expected = torch.tensor(target(temperature, top_k, top_p), dtype=torch.float64)
    frequency = torch.bincount(tokens, minlength=len(LOGITS)).double() / n
    # Binomial standard error at n = 200k is at most 0.0012: 5 of them.
    assert torch.allclose(frequency, expected, atol=0.006)
    assert frequency[expected == 0].sum() == 0
    assert torch.allclose(chosen.double(), expected[tokens].log(), atol=1e-5)


def test_the_inverse_cdf_maps_uniform_numbers_to_tokens_by_hand():
    # Probabilities 0.5, 0.3, 0.2: u below 0.5 gives token 0, up to 0.8 token 1, above token 2.
    logprobs = torch.tensor([[0.5, 0.3, 0.2]]).log().expand(4, -1)
    tokens, chosen = draw(logprobs, torch.tensor([0.1, 0.49, 0.55, 0.95], dtype=torch.float64))
    assert tokens.tolist() == [0, 0, 1, 2]
    assert torch.allclose(chosen.exp(), torch.tensor([0.5, 0.5, 0.3, 0.2]))


def test_greedy_draws_the_argmax_with_its_plain_logprob():
    logprobs = filtered_logprobs(LOGITS[None], SamplingConfig(temperature=0.0, top_k=2))
    token, chosen = draw(logprobs, None)
    assert token.tolist() == [0]
    assert chosen.item() == pytest.approx(LOGITS.log_softmax(-1)[0].item())  # no filter, no temperature


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.2}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -1}, "top_k must be >= 0"),
    ],
)
def test_sampling_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kwargs)


def test_cut_at_eos_keeps_the_first_eos_and_masks_the_rest():
    tokens = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9], [5, 6, 7, 2]])
    ids, mask, truncated = cut_at_eos(tokens, [2], pad_id=99)
    assert ids.tolist() == [[5, 2, 99, 99], [5, 6, 7, 8], [2, 99, 99, 99], [5, 6, 7, 2]]
    assert mask.tolist() == [
        [True, True, False, False],
        [True, True, True, True],
        [True, False, False, False],
        [True, True, True, True],
    ]
    assert truncated.tolist() == [False, True, False, False]


def test_cut_at_eos_with_several_eos_ids():
    tokens = torch.tensor([[5, 3, 2, 7], [5, 2, 3, 7], [4, 4, 4, 4]])
    ids, mask, truncated = cut_at_eos(tokens, [2, 3], pad_id=0)
    assert ids.tolist() == [[5, 3, 0, 0], [5, 2, 0, 0], [4, 4, 4, 4]]
    assert mask.tolist() == [[True, True, False, False], [True, True, False, False], [True, True, True, True]]
    assert truncated.tolist() == [False, False, True]


def test_cut_at_eos_leaves_the_input_alone():
    tokens = torch.tensor([[5, 2, 7]])
    cut_at_eos(tokens, [2], pad_id=0)
    assert tokens.tolist() == [[5, 2, 7]]
