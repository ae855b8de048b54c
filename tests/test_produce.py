"""The rollout pipeline end to end through a Trainer: the produced batch, the refine contexts, the support guard, the
selection modes, and the scheduler's plan reaching the rollout side."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import KeepBatch

from trd_lightning import RefinementScheduler
from trd_lightning.rollout.selection import RefinementPlan
from trd_lightning.verify import is_correct

REFINE = {"enabled": True}
# The demo world's models and data: a weak student whose rollouts are sometimes right and sometimes wrong.
DEMO_MODEL = {"student": "trd-demo/student", "teacher": "trd-demo/teacher", "micro_batch_size": 16}
DEMO_DATA = {
    "train_data": "trd-demo",
    "batch_size": 16,
    "prompt": {"student_template": "{problem}"},
    "rollout": {"max_new_tokens": 48},
    "refine": {**REFINE, "template": "{problem}\nDraft:\n{initial}\nFix the draft.", "temperature": 0.0},
}


def decode(tok, ids, mask) -> str:
    return tok.decode(ids[mask.bool()], skip_special_tokens=True)


@pytest.mark.parametrize(
    ("model", "data"),
    [
        ({}, {"refine": REFINE}),
        ({"teacher": None, "teacher_kind": "shared"}, {"refine": REFINE, "teacher_context": "privileged"}),
        ({}, {"refine": {**REFINE, "teacher_context": "original"}}),
    ],
    ids=["trd-opd", "trd-opsd", "original-context"],
)
def test_refined_batch_has_identical_response_ids_and_refine_contexts(make_run, tiny, tmp_path, model, data):
    keep = KeepBatch()
    trainer, module, dm = make_run(model=model, data=data, callbacks=[keep], max_steps=1)
    trainer.fit(module, dm)
    batch = keep.batches[0]
    b, tok = batch.produced, dm.tokenizer
    train = b.train
    width = train.response_ids.shape[1]
    assert torch.equal(train.student_ids[:, -width:], train.response_ids)
    assert torch.equal(train.teacher_ids[:, -width:], train.response_ids)
    assert b.refined.all() and not train.sampled.any() and b.original.sampled.all()
    for i, refined in enumerate(b.refined_text):
        assert refined is not None  # the default plan refines every rollout
        assert decode(tok, train.response_ids[i], train.response_mask[i]) == refined
        assert decode(tok, b.original.response_ids[i], b.original.response_mask[i]) == b.rollout_text[i]
        context = decode(tok, train.teacher_ids[i][:-width], train.teacher_mask[i][:-width])
        problem = batch.problem[i // b.num_generations]
        if data["refine"].get("teacher_context") == "original":
            assert "Your Initial Solution" not in context and problem in context
        else:
            # The teacher reads the refine prompt: the problem and the student's own attempt.
            assert "Your Initial Solution" in context and b.rollout_text[i][:20] in context
        student_context = decode(tok, train.student_ids[i][:-width], train.student_mask[i][:-width])
        assert "Your Initial Solution" not in student_context and problem in student_context


def test_without_refinement_the_batch_is_the_rollouts_in_their_usual_contexts(make_run, tiny, tmp_path):
    keep = KeepBatch()
    trainer, module, dm = make_run(data={"rollout": {"num_generations": 2}}, callbacks=[keep])
    trainer.fit(module, dm)
    batch = keep.batches[0]
    b = batch.produced
    assert b.original is None and not b.refined.any() and b.refined_text == [None] * 8 and b.train.sampled.all()
    prompts = batch.prompts.lists()
    for i in range(8):
        assert (
            b.train.student_ids[i][b.train.student_mask[i].bool()].tolist()[: len(prompts[i // 2])] == prompts[i // 2]
        )
    assert b.rollout_text[0] != b.rollout_text[1]  # the two rollouts of a prompt are drawn with different seeds


def test_support_guard_keeps_the_original_rollouts(make_run, tiny, tmp_path):
    """A guard no rewrite can pass keeps every y_o; a guard every rewrite passes keeps every y_r."""
    for threshold, expect_refined in ((0.0, False), (-1e9, True)):
        keep = KeepBatch()
        sched = RefinementScheduler(min_student_logprob=threshold)
        trainer, module, dm = make_run(data={"refine": REFINE}, callbacks=[sched, keep], max_steps=1)
        trainer.fit(module, dm)
        b = keep.batches[0].produced
        assert all((t is not None) == expect_refined for t in b.refined_text)
        assert float(trainer.callback_metrics["refine/guard_rejected"]) == (0.0 if expect_refined else 1.0)
        if not expect_refined:
            decoded = dm.tokenizer.batch_decode(b.train.response_ids, skip_special_tokens=True)
            assert decoded == b.rollout_text and b.train.sampled.all()


def test_incorrect_mode_refines_only_wrong_rollouts(make_run, tmp_path, tiny):
    keep = KeepBatch()
    sched = RefinementScheduler(mode="incorrect")
    trainer, module, dm = make_run(model=DEMO_MODEL, data=DEMO_DATA, callbacks=[sched, keep], max_steps=1)
    trainer.fit(module, dm)
    batch = keep.batches[0]
    b = batch.produced
    correct = [is_correct(text, answer) for text, answer in zip(b.rollout_text, batch.answer)]
    assert any(correct) and not all(correct)  # both kinds are present, so the mode has something to tell apart
    for right, refined in zip(correct, b.refined_text):
        assert (refined is not None) == (not right)
    metrics = trainer.callback_metrics
    assert float(metrics["refine/accuracy_before"]) == 0.0  # only wrong rollouts were rewritten
    assert float(metrics["rollout/accuracy"]) == pytest.approx(sum(correct) / len(correct))


def test_divergent_mode_refines_the_rollouts_the_teacher_finds_unlikely(make_run, tmp_path, tiny):
    keep = KeepBatch()
    sched = RefinementScheduler(mode="divergent", divergence_prob=0.05)
    trainer, module, dm = make_run(model=DEMO_MODEL, data=DEMO_DATA, callbacks=[sched, keep], max_steps=1)
    trainer.fit(module, dm)
    b = keep.batches[0].produced
    original = b.original
    # Independent reference: the teacher's full logits over each original sequence, position by position.
    with torch.no_grad():
        position = (original.teacher_mask.cumsum(-1) - 1).clamp(min=0)
        logits = module.teacher(
            original.teacher_ids, attention_mask=original.teacher_mask, position_ids=position
        ).logits
    width = original.response_ids.shape[1]
    logp = logits[:, -width - 1 : -1].log_softmax(-1).gather(-1, original.response_ids[..., None])[..., 0]
    divergent = ((logp < math.log(0.05)) & original.response_mask).any(-1).tolist()
    assert any(divergent) and not all(divergent)
    assert [t is not None for t in b.refined_text] == divergent


def test_the_schedulers_plan_reaches_the_rollout_side_through_its_api(make_run, tiny, tmp_path):
    """The scheduler hands each step's plan to ``plan_refinement``; the share refined follows it."""
    keep, plans = KeepBatch(), []
    sched = RefinementScheduler(schedule="step", p_start=0.0, p_end=1.0, total_steps=2, num_stairs=2)
    trainer, module, dm = make_run(data={"refine": REFINE}, callbacks=[sched, keep], max_steps=3)
    handed = dm.plan_refinement

    def record(plan: RefinementPlan) -> None:
        plans.append(plan)
        handed(plan)

    dm.plan_refinement = record
    trainer.fit(module, dm)
    # Two stairs over 2 steps: progress s / 2 puts step 0 on the first stair (0) and steps 1 and 2 on the last (1).
    assert [p.prob for p in plans] == [0.0, 1.0, 1.0]
    assert all(p.mode == "all" for p in plans)
    assert [int(b.produced.refined.sum()) for b in keep.batches] == [0, 4, 4]


def test_rows_generated_at_once_do_not_change_the_step(make_run, tiny, tmp_path):
    """The cap on rows per generation (rollouts and rewrites) gives the same batch as generating all at once."""
    batches = []
    for cap in (None, 3):
        keep = KeepBatch()
        data = {"refine": {**REFINE, "temperature": 1.0}, "rollout": {"max_generation_rows": cap}}
        trainer, module, dm = make_run(root=tmp_path / str(cap), data=data, callbacks=[keep], max_steps=1)
        trainer.fit(module, dm)
        batches.append(keep.batches[0].produced)
    assert batches[0].rollout_text == batches[1].rollout_text
    assert batches[0].refined_text == batches[1].refined_text
    assert torch.equal(batches[0].train.teacher_ids, batches[1].train.teacher_ids)
