"""Every loss path from hidden states against a float64 reference, and the fused paths against today's.

The reference writes each loss out from its definition on full ``[N, V]`` logits in float64, with probabilities (not
the library's log-space pieces); its gradients come from autograd through it. The paths (``entry.plan``) are the
closed form (the jsd family), the linear-head path (other losses, gradient by autograd in the forward pass) and the
checkpointed path (today's, for any head), each fused or not, with chunks by count or by memory.
"""

from __future__ import annotations

import pytest
import torch

from trd_lightning.losses import LossSpec, chunk_rows, jsd_and_grad, plan, token_losses

N, H_STUDENT, H_TEACHER, V = 96, 32, 48, 3000


# ------------------------------------------------------------------ float64 references
def _kl(p, q):
    return torch.where(p > 0, p * (p.log() - q.log()), 0.0)


def _divergence_terms(p_s, p_t, beta):
    """Per-entry terms of the divergence (forward KL at beta 0, reverse at 1, generalized JSD between)."""
    if beta == 0.0:
        return _kl(p_t, p_s)
    if beta == 1.0:
        return _kl(p_s, p_t)
    m = (1 - beta) * p_s + beta * p_t
    return beta * _kl(p_t, m) + (1 - beta) * _kl(p_s, m)


def reference(spec: LossSpec, s_logits, t_logits, token_ids=None, behavior=None, sampled=None):
    """Per-row loss of ``spec`` from float64 logits, written from the definitions."""
    s, t = s_logits / spec.temperature, t_logits / spec.temperature
    p_s, p_t = torch.softmax(s, -1), torch.softmax(t, -1)
    if spec.kind == "jsd":
        return _divergence_terms(p_s, p_t, spec.beta).sum(-1)
    if spec.kind == "pointwise_clip":
        return _divergence_terms(p_s, p_t, spec.beta).clamp(max=spec.pointwise_clip).sum(-1)
    if spec.kind == "topk":
        ranked = t_logits if spec.top_k_support == "teacher" else s_logits
        idx = ranked.detach().topk(spec.top_k, -1).indices
        top_s, top_t = p_s.gather(-1, idx), p_t.gather(-1, idx)
        if spec.top_k_tail:
            q_s = torch.cat([top_s, 1 - top_s.sum(-1, keepdim=True)], -1)
            q_t = torch.cat([top_t, 1 - top_t.sum(-1, keepdim=True)], -1)
        else:
            q_s, q_t = top_s / top_s.sum(-1, keepdim=True), top_t / top_t.sum(-1, keepdim=True)
        return _divergence_terms(q_s, q_t, spec.beta).sum(-1)
    log_s = p_s.log().gather(-1, token_ids[:, None]).squeeze(-1)
    log_t = p_t.log().gather(-1, token_ids[:, None]).squeeze(-1)
    advantage = (log_t - log_s).detach()
    # A rewritten token was sampled by no policy: its importance ratio is one.
    ratio = torch.where(sampled, torch.exp(log_s - behavior.detach()), torch.exp(log_s - log_s.detach()))
    return -(advantage * ratio)


# ------------------------------------------------------------------ the problem
def problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    s_hidden = torch.randn(N, H_STUDENT, generator=gen)
    t_hidden = torch.randn(N, H_TEACHER, generator=gen)
    # Logits with a spread of a few nats, like a trained head: peaked distributions, not uniform ones.
    student_head = torch.nn.Linear(H_STUDENT, V, bias=False)
    teacher_head = torch.nn.Linear(H_TEACHER, V, bias=False).requires_grad_(False)
    with torch.no_grad():
        student_head.weight.copy_(torch.randn(V, H_STUDENT, generator=gen) * 3 / H_STUDENT**0.5)
        teacher_head.weight.copy_(torch.randn(V, H_TEACHER, generator=gen) * 3 / H_TEACHER**0.5)
    token_ids = torch.randint(0, V, (N,), generator=gen)
    behavior = -torch.rand(N, generator=gen) * 4 - 4
    return s_hidden, t_hidden, student_head, teacher_head, token_ids, behavior


SAMPLED = torch.arange(N) % 3 != 0  # a third of the positions belong to rewrites


def row_weights(kind: str, seed: int = 1) -> torch.Tensor:
    """Upstream gradients: all equal (a plain sum), some zero (a token clip), or all different (TOPD)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.full((N,), 0.37)
    if kind == "clipped":
        return torch.where(torch.rand(N, generator=gen) < 0.2, 0.0, 0.37)
    return torch.rand(N, generator=gen) + 0.5


def run(spec: LossSpec, weights: torch.Tensor, seed: int = 0, head=None):
    """(values, hidden gradient, head-weight gradient) of ``token_losses`` under ``spec``."""
    s_hidden, t_hidden, student_head, teacher_head, token_ids, behavior = problem(seed)
    hidden = s_hidden.clone().requires_grad_()
    out = token_losses(
        hidden,
        t_hidden,
        student_head if head is None else head(student_head),
        teacher_head,
        spec,
        token_ids=token_ids,
        behavior_logprobs=behavior,
        sampled=SAMPLED,
    )
    (out * weights).sum().backward()
    assert teacher_head.weight.grad is None
    return out.detach(), hidden.grad, student_head.weight.grad


def run_reference(spec: LossSpec, weights: torch.Tensor, seed: int = 0):
    s_hidden, t_hidden, student_head, teacher_head, token_ids, behavior = problem(seed)
    hidden = s_hidden.double().requires_grad_()
    weight = student_head.weight.detach().double().requires_grad_()
    t_logits = t_hidden.double() @ teacher_head.weight.double().T
    out = reference(spec, hidden @ weight.T, t_logits, token_ids, behavior.double(), SAMPLED)
    (out * weights.double()).sum().backward()
    return out.detach(), hidden.grad, weight.grad


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """Every entry within ``tol``, or within ``tol`` times the largest magnitude of ``expected`` when that exceeds 1.

    fp32 rounding in a sum over V entries grows with the magnitude of the terms summed, so with losses and
    gradients of order 10 an entry near zero carries an absolute error of order 1e-5 in any fp32 computation,
    chunked or not (the float64 reference has none).
    """
    assert actual.shape == expected.shape
    error = (actual.double() - expected.double()).abs().max().item()
    bound = tol * max(1.0, expected.abs().max().item())
    assert error <= bound, f"max error {error:.3g} exceeds {bound:.3g}"


KINDS = [
    {"kind": "jsd", "beta": 0.0},
    {"kind": "jsd", "beta": 0.0, "temperature": 0.7},
    {"kind": "jsd", "beta": 0.5},
    {"kind": "jsd", "beta": 0.3, "temperature": 1.5},
    {"kind": "jsd", "beta": 1.0, "temperature": 0.7},
    {"kind": "topk", "top_k": 20},
    {"kind": "topk", "top_k": 20, "beta": 0.5, "top_k_tail": False},
    {"kind": "topk", "top_k": 20, "beta": 1.0, "top_k_support": "student"},
    {"kind": "topk", "top_k": 20, "top_k_tail": False, "top_k_support": "student", "temperature": 0.7},
    {"kind": "sampled_token"},
    {"kind": "sampled_token", "temperature": 0.7},
    {"kind": "pointwise_clip", "pointwise_clip": 0.002},
    {"kind": "pointwise_clip", "beta": 0.5, "pointwise_clip": 0.001},
    {"kind": "pointwise_clip", "beta": 1.0, "pointwise_clip": 0.002},
]


def _id(options: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in options.items())


@pytest.mark.parametrize("options", KINDS, ids=_id)
@pytest.mark.parametrize(
    "how",
    [
        {"fused": True, "chunk_size": 40},
        {"fused": True, "chunk_mib": 64 * V * 4 / 2**20},  # 64 rows per chunk, by memory
        {"fused": False, "chunk_size": 40},
        {"implementation": "checkpointed", "chunk_size": 40},
    ],
    ids=["fused", "fused-by-memory", "unfused", "checkpointed"],
)
def test_every_loss_and_path_matches_float64(options, how):
    spec = LossSpec(**options, **how)
    for weights in ("uniform", "clipped", "different"):
        actual, expected = run(spec, row_weights(weights)), run_reference(spec, row_weights(weights))
        assert actual[0].dtype == torch.float32
        for a, e in zip(actual, expected):
            assert_close_to_scale(a, e)


@pytest.mark.parametrize("options", [KINDS[0], KINDS[2], KINDS[4], KINDS[6], KINDS[9], KINDS[12]], ids=_id)
def test_fused_path_and_memory_chunks_equal_todays_path(options):
    """Today: the checkpointed path in chunks of 1024 positions. Same values and gradients to 1e-5 in fp32."""
    today = LossSpec(**options, implementation="checkpointed", chunk_size=1024)
    for chunks in ({"chunk_mib": 16 * V * 4 / 2**20}, {"chunk_size": 7}):
        for weights in ("uniform", "different"):
            new = run(LossSpec(**options, **chunks), row_weights(weights))
            old = run(today, row_weights(weights))
            for a, e in zip(new, old):
                assert_close_to_scale(a, e)


def test_the_path_each_spec_takes():
    linear = torch.nn.Linear(4, 10, bias=False)
    biased = torch.nn.Linear(4, 10)

    def capped(h):
        return torch.tanh(linear(h) / 30) * 30

    assert plan(LossSpec(), linear, linear) == "closed_form"
    assert plan(LossSpec(beta=0.5, fused=False), linear, linear) == "closed_form"
    assert plan(LossSpec(kind="topk"), linear, linear) == "linear"
    assert plan(LossSpec(kind="topk", fused=False), linear, linear) == "checkpointed"
    assert plan(LossSpec(implementation="checkpointed"), linear, linear) == "checkpointed"
    for head in (biased, capped):
        assert plan(LossSpec(), head, linear) == "checkpointed"
        assert plan(LossSpec(), linear, head) == "checkpointed"
        with pytest.raises(ValueError, match="bias-free linear output heads"):
            plan(LossSpec(implementation="closed_form"), head, linear)


def test_checkpointed_path_on_a_soft_capped_head_matches_float64():
    def capped(head):
        return lambda h: torch.tanh(head(h) / 4.0) * 4.0

    spec = LossSpec(beta=0.5, chunk_size=40)
    s_hidden, t_hidden, student_head, teacher_head, _, _ = problem()
    hidden = s_hidden.clone().requires_grad_()
    out = token_losses(hidden, t_hidden, capped(student_head), teacher_head, spec)
    (out * row_weights("different")).sum().backward()
    ref_hidden = s_hidden.double().requires_grad_()
    ref_weight = student_head.weight.detach().double().requires_grad_()
    s_logits = torch.tanh(ref_hidden @ ref_weight.T / 4.0) * 4.0
    expected = reference(spec, s_logits, t_hidden.double() @ teacher_head.weight.double().T)
    (expected * row_weights("different").double()).sum().backward()
    assert_close_to_scale(out.detach(), expected.detach())
    assert_close_to_scale(hidden.grad, ref_hidden.grad)
    assert_close_to_scale(student_head.weight.grad, ref_weight.grad)


def test_chunk_rows_follow_the_memory_budget_or_the_override():
    assert chunk_rows(LossSpec(), 151_936) == 220  # 128 MiB of float32 logits
    assert chunk_rows(LossSpec(), 512) == 65_536
    assert chunk_rows(LossSpec(chunk_mib=1.0), 2**20) == 1  # never fewer than one position
    assert chunk_rows(LossSpec(chunk_size=7), 151_936) == 7


@pytest.mark.parametrize("fused", [True, False])
def test_a_second_backward_through_a_retained_graph_gives_the_same_gradient(fused):
    s_hidden, t_hidden, student_head, teacher_head, _, _ = problem()
    hidden = s_hidden.clone().requires_grad_()
    out = token_losses(hidden, t_hidden, student_head, teacher_head, LossSpec(fused=fused, chunk_size=40))
    first = torch.autograd.grad(out.sum(), [hidden, student_head.weight], retain_graph=True)
    second = torch.autograd.grad(out.sum(), [hidden, student_head.weight])
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_still_do():
    s_hidden, t_hidden, student_head, teacher_head, _, _ = problem()
    student_head.requires_grad_(False)
    hidden = s_hidden.clone().requires_grad_()
    out = token_losses(hidden, t_hidden, student_head, teacher_head, LossSpec(chunk_size=40))
    (out * row_weights("different")).sum().backward()
    assert student_head.weight.grad is None
    assert_close_to_scale(hidden.grad, run_reference(LossSpec(), row_weights("different"))[1])


@pytest.mark.parametrize("kind", ["jsd", "topk"])
def test_no_rows_give_zero_gradients(kind):
    hidden = torch.zeros(0, 4, requires_grad=True)
    head = torch.nn.Linear(4, 10, bias=False)
    out = token_losses(hidden, torch.zeros(0, 6), head, torch.nn.Linear(6, 10, bias=False), LossSpec(kind=kind))
    out.sum().backward()
    assert out.shape == (0,) and torch.equal(head.weight.grad, torch.zeros_like(head.weight))
    assert hidden.grad.shape == (0, 4)


def test_bf16_models_give_the_checkpointed_paths_loss():
    s_hidden, t_hidden, student_head, teacher_head, _, _ = problem()
    student_head, teacher_head = student_head.bfloat16(), teacher_head.bfloat16()
    values = [
        token_losses(s_hidden.bfloat16(), t_hidden.bfloat16(), student_head, teacher_head, LossSpec(**how))
        for how in ({}, {"implementation": "checkpointed"})
    ]
    assert values[0].dtype == torch.float32
    torch.testing.assert_close(values[0], values[1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_closed_form_block_handles_masked_and_underflowing_entries(beta):
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(5, 40, generator=gen) * 3, torch.randn(5, 40, generator=gen) * 3
    t[:, :5] = -150.0  # exp underflows in float32
    s[:, 5:8] = t[:, 5:8] = float("-inf")  # masked entries
    loss, grad = jsd_and_grad(s, t, beta, 1.0, with_grad=True)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    # Masked entries have no mass on either side: the reference leaves them out, and their gradient is 0.
    kept = torch.ones(40, dtype=torch.bool)
    kept[5:8] = False
    ref_s = s[:, kept].double().requires_grad_()
    expected = reference(LossSpec(beta=beta), ref_s, t[:, kept].double())
    expected.sum().backward()
    assert_close_to_scale(loss, expected.detach())
    assert_close_to_scale(grad[:, kept], ref_s.grad)
    assert torch.equal(grad[:, ~kept], torch.zeros(5, 3))


def test_bad_specs_and_missing_inputs_are_refused():
    for options, match in (
        ({"beta": 1.5}, "beta"),
        ({"temperature": 0.0}, "temperature"),
        ({"kind": "topk", "implementation": "closed_form"}, "jsd family"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_mib": 0.0}, "chunk_mib"),
        ({"kind": "nope"}, "kind"),
    ):
        with pytest.raises(ValueError, match=match):
            LossSpec(**options)
    s_hidden, t_hidden, student_head, teacher_head, _, _ = problem()
    with pytest.raises(ValueError, match="token_ids and behavior_logprobs"):
        token_losses(s_hidden, t_hidden, student_head, teacher_head, LossSpec(kind="sampled_token"))
