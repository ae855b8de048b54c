"""RefinementScheduler: schedule values by hand, the plan it hands over, resume, and refusing a run without TRD."""

from __future__ import annotations

import math

import pytest
from helpers import KeepBatch, Recorder
from lightning.pytorch.callbacks import ModelCheckpoint

from trd_lightning import RefinementScheduler
from trd_lightning.callbacks.refinement import scheduled_value


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("constant", [0.2, 0.2, 0.2, 0.2]),
        ("linear", [0.2, 0.4, 0.6, 1.0]),
        ("cosine", [0.2, 0.2 + 0.8 * (1 - math.cos(math.pi * 0.25)) / 2, 0.6, 1.0]),
        ("step", [0.2, 0.2 + 0.8 / 3, 0.2 + 1.6 / 3, 1.0]),
    ],
)
def test_schedule_values_at_given_steps(schedule, expected):
    got = [scheduled_value(schedule, s, 100, 0.2, 1.0, num_stairs=4) for s in (0, 25, 50, 100)]
    assert got == pytest.approx(expected)
    assert scheduled_value(schedule, 500, 100, 0.2, 1.0) == pytest.approx(
        expected[-1] if schedule != "constant" else 0.2
    )


def test_the_plan_of_a_step_and_its_options(make_run, tiny, tmp_path):
    sched = RefinementScheduler(
        schedule="linear", p_start=0.0, p_end=1.0, total_steps=4, mode="divergent", divergence_prob=0.1,
        min_student_logprob=-3.0,
    )  # fmt: skip
    trainer, _, _ = make_run(max_steps=8)
    plan = sched.plan_at(3, trainer)
    assert plan.prob == pytest.approx(0.75) and plan.mode == "divergent"
    assert plan.divergence_logprob == pytest.approx(math.log(0.1)) and plan.min_student_logprob == -3.0
    assert RefinementScheduler().plan_at(5, trainer).prob == 1.0  # the paper's default: every rollout


def test_scheduler_logs_and_a_resumed_run_gets_the_same_plans_and_losses(make_run, tiny, tmp_path):
    rec, keep = Recorder(), KeepBatch()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer, module, dm = make_run(
        root=tmp_path / "a",
        data={"refine": {"enabled": True}},
        callbacks=[RefinementScheduler(schedule="linear", p_start=0.0, p_end=1.0, total_steps=4), rec, keep, ckpt],
        enable_checkpointing=True,
        max_steps=3,
    )
    trainer.fit(module, dm)
    assert keep.batches[0].produced.refined_text.count(None) == 4  # p = 0 at step 0: nothing refined
    assert float(trainer.callback_metrics["refine/prob"]) == pytest.approx(0.5)  # logged at step 2

    rec2, keep2 = Recorder(), KeepBatch()
    resumed = RefinementScheduler(schedule="linear", p_start=0.0, p_end=1.0, total_steps=4)
    trainer, module, dm = make_run(
        root=tmp_path / "b", data={"refine": {"enabled": True}}, callbacks=[resumed, rec2, keep2], max_steps=3
    )
    trainer.fit(module, dm, ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt"))
    assert dm.plan.prob == pytest.approx(0.5)  # the plan of step 2, handed over on resume as in the first run
    assert keep2.batches[0].produced.refined_text == keep.batches[2].produced.refined_text
    assert rec2.losses[3] == pytest.approx(rec.losses[3], rel=1e-5, abs=1e-7)


def test_scheduler_without_refinement_is_refused(make_run, tiny, tmp_path):
    trainer, module, dm = make_run(callbacks=[RefinementScheduler()], max_steps=1)
    with pytest.raises(ValueError, match="data.refine.enabled: true"):
        trainer.fit(module, dm)


def test_scheduler_incorrect_mode_without_answers_is_refused(make_run, tiny, tmp_path):
    sched = RefinementScheduler(mode="incorrect")
    data = {"refine": {"enabled": True}, "answer_column": None}
    trainer, module, dm = make_run(data=data, callbacks=[sched], max_steps=1)
    with pytest.raises(ValueError, match="needs answers"):
        trainer.fit(module, dm)


def test_text_samples_show_the_rollout_and_its_refinement(make_run, tiny, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trd_lightning import RolloutSamples

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer, module, dm = make_run(
        data={"refine": {"enabled": True}},
        callbacks=[RolloutSamples(every_n_steps=1)],
        logger=logger,
        max_steps=1,
    )
    trainer.fit(module, dm)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    text = events.Tensors("samples/rollout/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "rollout y_o" in text and "refined y_r" in text
    scalars = set(events.Tags()["scalars"])
    assert {"refine/accuracy_before", "refine/accuracy_after", "refine/edit_distance", "refine/length_ratio"} <= scalars
    assert {"refine/student_logprob", "refine/fraction"} <= scalars
