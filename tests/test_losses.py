"""Tests for trd_lightning.losses against independent float64 numpy references."""

import numpy as np
import pytest
import torch
from torch import nn

from trd_lightning.losses import (
    chunked_token_loss,
    divergence_from_logprobs,
    generalized_jsd,
    masked_divergence,
    sampled_token_loss,
    token_logprobs,
    topk_divergence,
)

RTOL, ATOL = 1e-5, 1e-6
BETAS = [0.0, 0.3, 0.5, 1.0]


# ---------------------------------------------------------------- references


def np_softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def np_kl(p, q):
    """KL(p || q) over the last axis, float64, 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * np.log(p / q), 0.0).sum(-1)


def np_div_probs(p_s, p_t, beta):
    if beta == 0.0:
        return np_kl(p_t, p_s)
    if beta == 1.0:
        return np_kl(p_s, p_t)
    m = (1 - beta) * p_s + beta * p_t
    return beta * np_kl(p_t, m) + (1 - beta) * np_kl(p_s, m)


def np_div(s_logits, t_logits, beta, temperature=1.0):
    p_s = np_softmax(np.asarray(s_logits, np.float64) / temperature)
    p_t = np_softmax(np.asarray(t_logits, np.float64) / temperature)
    return np_div_probs(p_s, p_t, beta)


def np_topk_div(s_logits, t_logits, k, beta, temperature, tail, support):
    s = np.asarray(s_logits, np.float64)
    t = np.asarray(t_logits, np.float64)
    ranked = t if support == "teacher" else s
    idx = np.argsort(-ranked, axis=-1)[..., :k]
    p_s = np.take_along_axis(np_softmax(s / temperature), idx, -1)
    p_t = np.take_along_axis(np_softmax(t / temperature), idx, -1)
    if tail:
        p_s = np.concatenate([p_s, 1 - p_s.sum(-1, keepdims=True)], -1)
        p_t = np.concatenate([p_t, 1 - p_t.sum(-1, keepdims=True)], -1)
    else:
        p_s = p_s / p_s.sum(-1, keepdims=True)
        p_t = p_t / p_t.sum(-1, keepdims=True)
    return np_div_probs(p_s, p_t, beta)


def logits_pair(*shape, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(*shape, generator=g) * scale,
        torch.randn(*shape, generator=g) * scale,
    )


def close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(
        actual.detach().double().numpy(), np.asarray(expected, np.float64), rtol=rtol, atol=atol
    )


# ------------------------------------------------------------ generalized_jsd


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_generalized_jsd_matches_reference(beta, temperature):
    s, t = logits_pair(3, 5, 40)
    out = generalized_jsd(s, t, beta=beta, temperature=temperature)
    assert out.shape == (3, 5) and out.dtype == torch.float32
    close(out, np_div(s.numpy(), t.numpy(), beta, temperature))


def test_endpoints_are_exact_kls():
    s, t = logits_pair(4, 30, seed=1)
    p_s, p_t = np_softmax(s.double().numpy()), np_softmax(t.double().numpy())
    close(generalized_jsd(s, t, beta=0.0), np_kl(p_t, p_s))
    close(generalized_jsd(s, t, beta=1.0), np_kl(p_s, p_t))


@pytest.mark.parametrize("beta", BETAS)
def test_identical_distributions_give_zero(beta):
    s, _ = logits_pair(6, 50, seed=2, scale=5.0)
    assert generalized_jsd(s, s.clone(), beta=beta).abs().max() < 1e-6
    for tail in (True, False):
        for support in ("teacher", "student"):
            out = topk_divergence(s, s.clone(), k=7, beta=beta, tail=tail, support=support)
            assert out.abs().max() < 1e-6


@pytest.mark.parametrize("fn", ["jsd", "topk"])
def test_invalid_arguments_raise(fn):
    s, t = logits_pair(2, 10)
    call = (
        (lambda **kw: generalized_jsd(s, t, **kw))
        if fn == "jsd"
        else (lambda **kw: topk_divergence(s, t, k=3, **kw))
    )
    for beta in (-0.1, 1.5):
        with pytest.raises(ValueError, match="beta"):
            call(beta=beta)
    with pytest.raises(ValueError, match="temperature"):
        call(temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        divergence_from_logprobs(s.log_softmax(-1), t.log_softmax(-1), 1.5)


@pytest.mark.parametrize("beta", BETAS)
def test_bf16_inputs_are_upcast(beta):
    s, t = logits_pair(3, 64, seed=3)
    s16, t16 = s.bfloat16(), t.bfloat16()
    out = generalized_jsd(s16, t16, beta=beta, temperature=0.7)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, generalized_jsd(s16.float(), t16.float(), beta, 0.7), rtol=0, atol=0)
    out_k = topk_divergence(s16, t16, k=9, beta=beta)
    assert out_k.dtype == torch.float32
    torch.testing.assert_close(out_k, topk_divergence(s16.float(), t16.float(), 9, beta), rtol=0, atol=0)


def test_divergence_from_logprobs_reference_and_underflow():
    s, t = logits_pair(5, 20, seed=4)
    for beta in BETAS:
        close(
            divergence_from_logprobs(s.log_softmax(-1), t.log_softmax(-1), beta),
            np_div(s.numpy(), t.numpy(), beta),
        )
    # Probabilities that underflow (and exact -inf logits) must not give NaN.
    # exp(-150) is 0 in float32 but not in the float64 reference.
    s = s.clone().requires_grad_(True)
    t_extreme = t.clone()
    t_extreme[:, :5] = -150.0
    t_extreme[:, 5:8] = float("-inf")
    for beta in BETAS:
        s.grad = None
        s_masked = s.clone()
        s_masked[:, 5:8] = float("-inf")
        out = generalized_jsd(s_masked, t_extreme, beta=beta)
        assert torch.isfinite(out).all()
        out.sum().backward()
        assert torch.isfinite(s.grad).all()
        ref = np_div(s_masked.detach().numpy(), t_extreme.numpy(), beta)
        close(out, ref, rtol=1e-4)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_masked_divergence_matches_reference(beta, temperature):
    s, t = logits_pair(3, 6, 25, seed=5)
    mask = torch.rand(3, 6, generator=torch.Generator().manual_seed(0)) > 0.4
    mask[0, 0], mask[0, 1] = True, False
    out = masked_divergence(s, t, mask, beta=beta, temperature=temperature)
    assert out.dim() == 0
    ref = np_div(s.numpy(), t.numpy(), beta, temperature)[mask.numpy()].sum()
    close(out, ref)
    assert masked_divergence(s, t, torch.zeros(3, 6, dtype=torch.bool)) == 0


# ------------------------------------------------------------ topk_divergence


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
@pytest.mark.parametrize("support", ["teacher", "student"])
def test_topk_tail_matches_reference(beta, temperature, support):
    s, t = logits_pair(4, 3, 30, seed=6)
    out = topk_divergence(s, t, k=6, beta=beta, temperature=temperature, support=support)
    assert out.shape == (4, 3)
    close(out, np_topk_div(s.numpy(), t.numpy(), 6, beta, temperature, True, support))


@pytest.mark.parametrize("beta", BETAS)
def test_topk_full_vocab_equals_full_divergence(beta):
    s, t = logits_pair(5, 16, seed=7)
    s.requires_grad_(True)
    for k in (16, 100):  # k is clamped to V
        out = topk_divergence(s, t, k=k, beta=beta, temperature=0.7)
        close(out, np_div(s.detach().numpy(), t.numpy(), beta, 0.7))
        s.grad = None
        out.sum().backward()
        assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("beta", [1.0, 0.0, 0.5])
@pytest.mark.parametrize("support", ["teacher", "student"])
def test_topk_renormalised_matches_reference(beta, support):
    s, t = logits_pair(6, 40, seed=8)
    out = topk_divergence(s, t, k=5, beta=beta, temperature=2.0, tail=False, support=support)
    close(out, np_topk_div(s.numpy(), t.numpy(), 5, beta, 2.0, False, support))


def test_topk_gradient_only_to_student_and_finite_with_zero_tail():
    # Extremely peaked logits: tail mass underflows to ~0 for both models.
    s, t = logits_pair(4, 50, seed=9)
    s = (s * 100).requires_grad_(True)
    t = (t * 100).requires_grad_(True)
    for beta in BETAS:
        s.grad = t.grad = None
        out = topk_divergence(s, t, k=3, beta=beta)
        assert torch.isfinite(out).all()
        out.sum().backward()
        assert torch.isfinite(s.grad).all()
        assert t.grad is None


def test_topk_gradient_matches_float64_autograd():
    s, t = logits_pair(3, 12, seed=10)
    s32 = s.clone().requires_grad_(True)
    topk_divergence(s32, t, k=4, beta=0.5).sum().backward()
    # Independent float64 autograd implementation of the (k+1)-bin divergence.
    s64 = s.double().requires_grad_(True)
    idx = t.double().topk(4, -1).indices
    p_s = s64.softmax(-1).gather(-1, idx)
    p_t = t.double().softmax(-1).gather(-1, idx)
    p_s = torch.cat([p_s, 1 - p_s.sum(-1, keepdim=True)], -1)
    p_t = torch.cat([p_t, 1 - p_t.sum(-1, keepdim=True)], -1)
    m = 0.5 * p_s + 0.5 * p_t
    ref = 0.5 * (p_t * (p_t / m).log()).sum(-1) + 0.5 * (p_s * (p_s / m).log()).sum(-1)
    ref.sum().backward()
    close(s32.grad, s64.grad.numpy(), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------- sampled token losses


def test_sampled_token_loss_value_and_gradient():
    g = torch.Generator().manual_seed(11)
    s = -torch.rand(4, 7, generator=g, dtype=torch.float64) * 3
    t = -torch.rand(4, 7, generator=g, dtype=torch.float64) * 3
    b = -torch.rand(4, 7, generator=g, dtype=torch.float64) * 3

    on_policy = sampled_token_loss(s, t, s.clone())
    assert on_policy.dtype == torch.float32
    close(on_policy, (s - t).numpy())

    s_req = s.float().requires_grad_(True)
    loss = sampled_token_loss(s_req, t.float(), b.float())
    sn, tn, bn = s.float().double().numpy(), t.float().double().numpy(), b.float().double().numpy()
    advantage = -(sn - tn)
    ratio = np.exp(sn - bn)
    close(loss, -advantage * ratio)
    loss.sum().backward()
    close(s_req.grad, -advantage * ratio)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_matches_reference(temperature):
    s, _ = logits_pair(3, 4, 33, seed=12)
    ids = torch.randint(0, 33, (3, 4), generator=torch.Generator().manual_seed(1))
    out = token_logprobs(s.bfloat16(), ids, temperature=temperature)
    assert out.shape == (3, 4) and out.dtype == torch.float32
    p = np_softmax(s.bfloat16().double().numpy() / temperature)
    ref = np.log(np.take_along_axis(p, ids.numpy()[..., None], -1)[..., 0])
    close(out, ref)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(s, ids, temperature=0.0)


# --------------------------------------------------------- chunked_token_loss

N, H, V = 37, 16, 50


def make_problem(seed=13):
    torch.manual_seed(seed)
    student_head = nn.Linear(H, V)
    teacher_head = nn.Linear(H, V)
    s_hidden = torch.randn(N, H)
    t_hidden = torch.randn(N, H)
    return student_head, teacher_head, s_hidden, t_hidden


def grads_of(loss_fn, student_head, teacher_head, s_hidden, t_hidden, chunk_size=None, aux=()):
    student_head.zero_grad(set_to_none=True)
    h = s_hidden.clone().requires_grad_(True)
    if chunk_size is None:
        with torch.no_grad():
            t_logits = teacher_head(t_hidden)
        out = loss_fn(student_head(h), t_logits, *aux)
    else:
        out = chunked_token_loss(h, t_hidden, student_head, teacher_head, loss_fn, chunk_size, *aux)
    # A non-uniform weighting checks each row's gradient lands on that row.
    weights = torch.linspace(0.5, 1.5, out.shape[0])
    (out * weights).sum().backward()
    return out.detach(), h.grad, student_head.weight.grad.clone(), student_head.bias.grad.clone()


@pytest.mark.parametrize("chunk_size", [1, 8, 64])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_matches_unchunked(chunk_size, beta):
    problem = make_problem()
    loss_fn = lambda s, t: generalized_jsd(s, t, beta=beta, temperature=0.7)  # noqa: E731
    expected = grads_of(loss_fn, *problem)
    actual = grads_of(loss_fn, *problem, chunk_size=chunk_size)
    assert actual[0].shape == (N,)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    assert problem[1].weight.grad is None  # the teacher head never gets gradient


@pytest.mark.parametrize("chunk_size", [1, 8, 64])
def test_chunked_slices_aux_tensors(chunk_size):
    problem = make_problem(seed=14)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (N,), generator=gen)
    behavior = -torch.rand(N, generator=gen) * 4

    def loss_fn(s_logits, t_logits, token_ids, behavior_logp):
        return sampled_token_loss(
            token_logprobs(s_logits, token_ids), token_logprobs(t_logits, token_ids), behavior_logp
        )

    expected = grads_of(loss_fn, *problem, aux=(ids, behavior))
    actual = grads_of(loss_fn, *problem, chunk_size=chunk_size, aux=(ids, behavior))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_chunked_empty_input():
    student_head, teacher_head, _, _ = make_problem()
    h = torch.randn(0, H, requires_grad=True)
    out = chunked_token_loss(h, torch.randn(0, H), student_head, teacher_head, generalized_jsd, 8)
    assert out.shape == (0,)
    out.sum().backward()
    assert h.grad is not None and h.grad.shape == (0, H)
    assert student_head.weight.grad is None or not student_head.weight.grad.any()


def test_chunked_validates_arguments():
    student_head, teacher_head, s_hidden, t_hidden = make_problem()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_loss(s_hidden, t_hidden, student_head, teacher_head, generalized_jsd, 0)
    with pytest.raises(ValueError, match="rows"):
        chunked_token_loss(s_hidden, t_hidden[:-1], student_head, teacher_head, generalized_jsd, 8)


class RecordingHead(nn.Module):
    """Wraps a head and records the row counts it is called with, per phase."""

    def __init__(self, head):
        super().__init__()
        self.head = head
        self.phase = "forward"
        self.rows = {"forward": [], "backward": []}

    def forward(self, x):
        self.rows[self.phase].append(x.shape[0])
        return self.head(x)


@pytest.mark.parametrize("chunk_size", [1, 8, 16])
def test_chunked_never_materialises_more_than_one_chunk(chunk_size):
    student_head, teacher_head, s_hidden, t_hidden = make_problem()
    s_rec, t_rec = RecordingHead(student_head), RecordingHead(teacher_head)
    h = s_hidden.clone().requires_grad_(True)

    # Every tensor that autograd keeps alive between forward and backward
    # outside the checkpointed regions goes through this hook; vocab-sized
    # ones would be logits (or their softmaxes) held for the backward pass.
    saved_vocab_elems = []

    def pack(x):
        if x.dim() >= 1 and x.shape[-1] == V:
            saved_vocab_elems.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = chunked_token_loss(
            h, t_hidden, s_rec, t_rec, lambda s, t: generalized_jsd(s, t, beta=0.5), chunk_size
        )
    n_chunks = -(-N // chunk_size)
    assert len(s_rec.rows["forward"]) == n_chunks
    assert sum(saved_vocab_elems) <= chunk_size * V

    s_rec.phase = t_rec.phase = "backward"
    out.sum().backward()
    # The logits were recomputed chunk by chunk in backward, not saved.
    assert len(s_rec.rows["backward"]) == n_chunks
    assert sum(s_rec.rows["backward"]) == N
    for rec in (s_rec, t_rec):
        all_rows = rec.rows["forward"] + rec.rows["backward"]
        assert max(all_rows) <= chunk_size
    assert h.grad is not None and torch.isfinite(h.grad).all()
