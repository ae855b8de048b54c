"""The module's loss through its one entry point: the path each option takes, and one step the same on every path."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import Recorder

from trd_lightning import DistillationModule, losses
from trd_lightning.hf import output_head
from trd_lightning.losses import entry, linear


def first_step(make_run, root, model: dict):
    """The logged loss and the gradients of one step (same seed, so the same rollouts on every path)."""
    L.seed_everything(0)
    rec = Recorder(grads=True)
    trainer, module, data = make_run(root=root, model={"max_grad_norm": None, **model}, callbacks=[rec], max_steps=1)
    trainer.fit(module, data)
    return rec.losses[1], rec.grads[0]


@pytest.mark.parametrize(
    "options",
    [{}, {"beta": 0.5, "loss_temperature": 0.7}, {"loss": "topk", "loss_top_k": 5}, {"token_clip": 0.0097}],
    ids=["forward-kl", "jsd", "topk", "token-clip"],
)
def test_one_step_is_the_same_on_todays_path_and_the_fused_one(make_run, tmp_path, options, monkeypatch):
    """Today's path (checkpointed, 1024 positions per chunk) against the default (fused, chunks by memory) and
    the unfused one in chunks of 5 positions: same loss, same gradients."""
    clipped = []
    clip = losses.kl_token_clip

    def spy(per_token, value):
        clipped.append((per_token > value).float().mean().item())
        return clip(per_token, value)

    monkeypatch.setattr(losses, "kl_token_clip", spy)
    today = first_step(
        make_run, tmp_path / "today", {**options, "loss_implementation": "checkpointed", "loss_chunk_size": 1024}
    )
    for name, how in {"fused": {}, "unfused": {"loss_fused": False, "loss_chunk_size": 5}}.items():
        loss, grads = first_step(make_run, tmp_path / name, {**options, **how})
        # topk's tail bucket (1 - the top-k mass, about 1e-4 here) cancels in float32: 1e-4 relative, not 1e-5.
        assert loss == pytest.approx(today[0], rel=1e-4 if options.get("loss") == "topk" else 1e-5)
        assert grads.keys() == today[1].keys() and grads
        for key in grads:
            torch.testing.assert_close(grads[key], today[1][key], atol=1e-6, rtol=1e-4, msg=key)
    # The clip sits inside this step's per-token KL (0.008 to 0.011 on the tiny pair): it must clip some tokens
    # and keep others, on every path.
    if "token_clip" in options:
        assert clipped and all(0.0 < share < 1.0 for share in clipped), clipped


def test_the_module_takes_the_path_plan_picks(make_run, tmp_path, monkeypatch):
    """``auto`` runs the jsd family in closed form, other losses on the linear-head path, and falls back to the
    checkpointed path for a soft-capped head or with fusion off."""
    taken = []
    pick = entry.plan
    monkeypatch.setattr(entry, "plan", lambda *a: taken.append(pick(*a)) or taken[-1])
    cases = [
        ({}, "closed_form"),
        ({"beta": 0.5}, "closed_form"),
        ({"loss": "topk"}, "linear"),
        ({"loss": "sampled_token"}, "linear"),
        ({"loss": "topk", "loss_fused": False}, "checkpointed"),
        ({"loss_implementation": "checkpointed"}, "checkpointed"),
    ]
    for i, (model, expected) in enumerate(cases):
        taken.clear()
        trainer, module, data = make_run(root=tmp_path / str(i), model=model, max_steps=1)
        assert module.hparams.loss_implementation == model.get("loss_implementation", "auto")
        trainer.fit(module, data)
        assert taken and set(taken) == {expected}, (model, taken)
    # A soft-capped head is not a plain linear map: auto falls back rather than refusing.
    module.student.config.final_logit_softcapping = 30.0
    heads = output_head(module.student), output_head(module.teacher)
    assert losses.plan(module.objective.spec, *heads) == "checkpointed"


def test_closed_form_refuses_other_losses_and_soft_capped_heads(make_run, tmp_path):
    with pytest.raises(ValueError, match="jsd family"):
        DistillationModule(student="s", teacher="t", loss_implementation="closed_form", loss="topk")
    trainer, module, data = make_run(root=tmp_path, model={"loss_implementation": "closed_form"})
    module.configure_model()
    module.student.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="bias-free linear output heads"):
        losses.plan(module.objective.spec, output_head(module.student), output_head(module.teacher))


def test_a_plain_sum_recomputes_nothing_and_a_clip_only_the_clipped_rows(monkeypatch):
    """The fused path's backward: rows whose upstream gradient is the common one are not recomputed (each pass is
    logged as (rows, whether it takes gradients)); without autograd, no gradient is taken."""
    passes = []
    chunk_pass = linear._chunk_pass
    monkeypatch.setattr(
        linear, "_chunk_pass", lambda h, *a: passes.append((h.shape[0], a[-1] is not None)) or chunk_pass(h, *a)
    )
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 8, generator=gen, requires_grad=True)
    heads = torch.nn.Linear(8, 300, bias=False), torch.nn.Linear(8, 300, bias=False)
    weights = torch.ones(50)
    weights[[3, 17, 40]] = 0.0
    for upstream, recomputed in ((torch.ones(50), []), (weights, [3])):
        passes.clear()
        out = losses.token_losses(hidden, torch.randn(50, 8, generator=gen), *heads, losses.LossSpec(chunk_size=16))
        (out * upstream).sum().backward()
        assert passes == [(50, True), *((n, True) for n in recomputed)]
    # Without autograd the forward computes values only.
    passes.clear()
    with torch.no_grad():
        losses.token_losses(hidden, torch.randn(50, 8, generator=gen), *heads, losses.LossSpec(chunk_size=16))
    assert passes == [(50, False)]
