"""Tests for trd_lightning.losses against independent float64 numpy references."""

import numpy as np
import pytest
import torch
from torch import nn

from trd_lightning.losses import (
    chunked_token_loss,
    divergence_from_logprobs,
    generalized_jsd,
    kl_token_clip,
    masked_divergence,
    near_future_weights,
    persistent_divergence_mask,
    pointwise_clipped_divergence,
    sampled_token_loss,
    token_logprobs,
    topd_token_loss,
    topk_divergence,
    topk_reverse_kl,
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
    np.testing.assert_allclose(actual.detach().double().numpy(), np.asarray(expected, np.float64), rtol=rtol, atol=atol)


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
        (lambda **kw: generalized_jsd(s, t, **kw)) if fn == "jsd" else (lambda **kw: topk_divergence(s, t, k=3, **kw))
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
        out = chunked_token_loss(h, t_hidden, s_rec, t_rec, lambda s, t: generalized_jsd(s, t, beta=0.5), chunk_size)
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


# ------------------------------------------------ token-level clipping baselines


def test_kl_token_clip_values_and_gradient():
    per_token = torch.tensor([[0.02, 0.5, 0.09], [3.0, -0.01, 0.11]], requires_grad=True)
    out = kl_token_clip(per_token, clip=0.1)
    assert out.dtype == torch.float32
    close(out, [[0.02, 0.1, 0.09], [0.1, -0.01, 0.1]])
    out.sum().backward()
    # Clipped positions are constants; the others pass the gradient through.
    close(per_token.grad, [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], atol=0)
    assert kl_token_clip(per_token.detach().bfloat16()).dtype == torch.float32


def np_pointwise_terms(s_logits, t_logits, beta, temperature):
    """Per-vocabulary-entry terms of the divergence, float64: [..., V]."""
    p_s = np_softmax(np.asarray(s_logits, np.float64) / temperature)
    p_t = np_softmax(np.asarray(t_logits, np.float64) / temperature)
    if beta == 0.0:
        return p_t * np.log(p_t / p_s)
    if beta == 1.0:
        return p_s * np.log(p_s / p_t)
    m = (1 - beta) * p_s + beta * p_t
    return beta * p_t * np.log(p_t / m) + (1 - beta) * p_s * np.log(p_s / m)


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_pointwise_clipped_divergence_matches_reference(beta):
    s, t = logits_pair(3, 4, 30, seed=20)
    clip = 0.02
    out = pointwise_clipped_divergence(s, t, beta=beta, temperature=0.7, clip=clip)
    assert out.shape == (3, 4) and out.dtype == torch.float32
    terms = np_pointwise_terms(s.numpy(), t.numpy(), beta, 0.7)
    # The case must exercise both sides of the clip, and negative entries
    # where they exist (the combined interior entries are >= 0).
    assert (terms > clip).any() and (terms < clip).any()
    assert (terms < 0).any() == (beta in (0.0, 1.0))
    close(out, np.minimum(terms, clip).sum(-1))


@pytest.mark.parametrize("beta", BETAS)
def test_pointwise_clipped_divergence_huge_clip_is_generalized_jsd(beta):
    s, t = logits_pair(5, 40, seed=21)
    out = pointwise_clipped_divergence(s, t, beta=beta, temperature=0.7, clip=1e6)
    torch.testing.assert_close(out, generalized_jsd(s, t, beta=beta, temperature=0.7), rtol=1e-5, atol=1e-6)


def test_pointwise_clipped_entry_gets_no_gradient():
    # Teacher puts ~0.98 on entry 0, student is uniform: entry 0's forward-KL
    # term is ~1.34 (clamped), the others ~-0.024 (kept). Only the kept terms
    # -p_T(v) log p_S(v) (v != 0, plus constants) depend on the student, so
    # d/ds_j = (1 - p_T(0)) p_S(j) - p_T(j) [j != 0].
    s = torch.zeros(1, 4, requires_grad=True)
    t = torch.tensor([[5.0, 0.0, 0.0, 0.0]])
    out = pointwise_clipped_divergence(s, t, beta=0.0, clip=0.05)
    out.sum().backward()
    p_s = np.full(4, 0.25)
    p_t = np_softmax(t.double().numpy()[0])
    expected = (1 - p_t[0]) * p_s - np.where(np.arange(4) != 0, p_t, 0.0)
    close(s.grad[0], expected)
    close(out, 0.05 + (p_t[1:] * np.log(p_t[1:] / 0.25)).sum())
    # The unclipped gradient p_S - p_T is very different.
    assert not np.allclose(expected, p_s - p_t, atol=0.1)


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_pointwise_clipped_gradient_is_unclamped_entries_gradient(beta):
    s, t = logits_pair(3, 25, seed=22)
    clip = 0.02
    s32, t32 = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    pointwise_clipped_divergence(s32, t32, beta=beta, temperature=0.7, clip=clip).sum().backward()
    # float64 autograd reference: the sum of the entries below the clip only.
    s64, t64 = s.double().requires_grad_(True), t.double().requires_grad_(True)
    p_s, p_t = (s64 / 0.7).softmax(-1), (t64 / 0.7).softmax(-1)
    if beta == 0.0:
        terms = p_t * (p_t / p_s).log()
    elif beta == 1.0:
        terms = p_s * (p_s / p_t).log()
    else:
        m = (1 - beta) * p_s + beta * p_t
        terms = beta * p_t * (p_t / m).log() + (1 - beta) * p_s * (p_s / m).log()
    kept = terms.detach() <= clip
    assert (~kept).any() and kept.any()
    (terms * kept).sum().backward()
    close(s32.grad, s64.grad.numpy(), rtol=1e-4, atol=1e-6)
    close(t32.grad, t64.grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k, temperature", [(32, 1.0), (5, 0.7)])
def test_topk_reverse_kl_matches_reference(k, temperature):
    s, t = logits_pair(3, 4, 100, seed=23)
    s = s.requires_grad_(True)
    # k=32, temperature=1 are the defaults: call without them to pin those too.
    out = topk_reverse_kl(s, t, k=k, temperature=temperature) if k != 32 else topk_reverse_kl(s, t)
    assert out.shape == (3, 4) and out.dtype == torch.float32
    sn, tn = s.detach().double().numpy(), t.double().numpy()
    idx = np.argsort(-tn, axis=-1)[..., :k]
    q_s = np.take_along_axis(np_softmax(sn / temperature), idx, -1)
    q_t = np.take_along_axis(np_softmax(tn / temperature), idx, -1)
    q_s, q_t = q_s / q_s.sum(-1, keepdims=True), q_t / q_t.sum(-1, keepdims=True)
    close(out, (q_s * np.log(q_s / q_t)).sum(-1))
    out.sum().backward()
    assert torch.isfinite(s.grad).all()


# ------------------------------------------------------ TOPD-style weighting

# Threshold 1, window 2. Row 0: a persistent drift at 1..3 (1 and 2 are
# divergent; 3 is not: its next two are low) and a lone spike at 6 followed by
# one low value (not divergent). Row 1: a lone spike at 1 (not divergent), a
# drift at 4..5 whose only valid follower of 4 is 5 (divergent), 5 is followed
# only by masked positions (does not persist), and a masked tail at 6..7 whose
# large values must be ignored.
PER_TOKEN = [
    [0.2, 3.0, 2.0, 2.5, 0.1, 0.2, 5.0, 0.1],
    [0.5, 4.0, 0.1, 0.2, 2.0, 3.0, 9.0, float("nan")],
]
MASK = [[True] * 8, [True] * 6 + [False] * 2]
EXPECTED_DIVERGENT = [
    [False, True, True, False, False, False, False, False],
    [False, False, False, False, True, False, False, False],
]


def test_persistent_divergence_mask_hand_example():
    per_token, mask = torch.tensor(PER_TOKEN), torch.tensor(MASK)
    out = persistent_divergence_mask(per_token, mask, threshold=1.0, window=2)
    assert out.dtype == torch.bool
    assert out.tolist() == EXPECTED_DIVERGENT
    # One sequence without a batch dim, and a 0/1 integer mask.
    row = persistent_divergence_mask(per_token[0], mask[0].long(), threshold=1.0, window=2)
    assert row.tolist() == EXPECTED_DIVERGENT[0]


def loop_persistent(per_token, mask, threshold, window):
    """Direct loop over positions and their windows, float64."""
    per_token, mask = np.asarray(per_token, np.float64), np.asarray(mask, bool)
    out = np.zeros(per_token.shape, bool)
    for b in range(per_token.shape[0]):
        for t in range(per_token.shape[1]):
            future = [per_token[b, u] for u in range(t + 1, t + window + 1) if u < per_token.shape[1] and mask[b, u]]
            out[b, t] = mask[b, t] and per_token[b, t] > threshold and bool(future) and np.mean(future) > threshold
    return out


@pytest.mark.parametrize("window", [1, 3, 30])
def test_persistent_divergence_mask_matches_loop(window):
    g = torch.Generator().manual_seed(24)
    per_token = torch.rand(4, 20, generator=g) * 2.5
    mask = torch.rand(4, 20, generator=g) > 0.25  # holes in the middle too
    out = persistent_divergence_mask(per_token, mask, threshold=1.0, window=window)
    ref = loop_persistent(per_token.numpy(), mask.numpy(), 1.0, window)
    assert ref.any() and (out.numpy() == ref).all()


def test_near_future_weights_hand_example():
    # Window 2, discount 0.5: each divergent t adds 1, 0.5, 0.25 at t, t+1, t+2.
    divergent = torch.tensor(
        [
            [False, True, True, False, False, False, True, False],
            [True, False, False, False, False, True, False, True],  # 7 is masked
        ]
    )
    mask = torch.tensor([[True] * 8, [True] * 6 + [False] * 2])
    expected = [
        # 1 -> 1, .5, .25 at 1..3; 2 -> 1, .5, .25 at 2..4 (overlap adds); 6 -> 1, .5 at 6..7.
        [0.0, 1.0, 1.5, 0.75, 0.25, 0.0, 1.0, 0.5],
        # 0 -> 1, .5, .25 at 0..2; 5 -> 1 at 5, masked 6; the flag at masked 7 is ignored.
        [1.0, 0.5, 0.25, 0.0, 0.0, 1.0, 0.0, 0.0],
    ]
    out = near_future_weights(divergent, mask, window=2, discount=0.5)
    assert out.dtype == torch.float32
    close(out, expected, atol=0)
    close(near_future_weights(divergent[0], mask[0], window=2, discount=0.5), expected[0], atol=0)


def test_topd_token_loss_value_and_gradient():
    per_token = torch.tensor(PER_TOKEN, requires_grad=True)
    mask = torch.tensor(MASK)
    # Divergent states (EXPECTED_DIVERGENT) spread with window 2, discount 0.5.
    weights = [
        [0.0, 1.0, 1.5, 0.75, 0.25, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 1.0, 0.5, 0.0, 0.0],
    ]
    out = topd_token_loss(per_token, mask, threshold=1.0, window=2, discount=0.5)
    assert out.dtype == torch.float32
    # The masked NaN must not leak into the loss or its gradient.
    expected = np.nan_to_num(np.asarray(PER_TOKEN)) * np.asarray(weights)
    close(out, expected)
    out.sum().backward()
    close(per_token.grad, weights, atol=0)


def test_new_losses_invalid_arguments_raise():
    s, t = logits_pair(2, 10)
    per_token, mask = torch.tensor(PER_TOKEN), torch.tensor(MASK)
    for clip in (0.0, -0.1):
        with pytest.raises(ValueError, match="clip"):
            kl_token_clip(per_token, clip=clip)
        with pytest.raises(ValueError, match="clip"):
            pointwise_clipped_divergence(s, t, clip=clip)
    with pytest.raises(ValueError, match="beta"):
        pointwise_clipped_divergence(s, t, beta=1.5)
    with pytest.raises(ValueError, match="temperature"):
        pointwise_clipped_divergence(s, t, temperature=0.0)
    with pytest.raises(ValueError, match="k must"):
        topk_reverse_kl(s, t, k=0)
    with pytest.raises(ValueError, match="temperature"):
        topk_reverse_kl(s, t, temperature=-1.0)
    with pytest.raises(ValueError, match="window"):
        topd_token_loss(per_token, mask, window=0)
    for discount in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="discount"):
            topd_token_loss(per_token, mask, discount=discount)
        with pytest.raises(ValueError, match="discount"):
            near_future_weights(mask, mask, window=2, discount=discount)
    with pytest.raises(ValueError, match="threshold"):
        topd_token_loss(per_token, mask, threshold=-0.1)
    with pytest.raises(ValueError, match="window"):
        persistent_divergence_mask(per_token, mask, threshold=1.0, window=0)
    with pytest.raises(ValueError, match="mask"):
        persistent_divergence_mask(per_token, mask[:, :-1], threshold=1.0, window=2)
    with pytest.raises(ValueError, match="mask"):
        near_future_weights(mask, mask[0], window=2)
