"""End-to-end training behaviour on tiny models: gradient accumulation, resume, teacher kinds."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import Recorder
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger

from trd_lightning.lora import LoraOptions


@pytest.mark.parametrize("loss", ["jsd", "topk", "sampled_token"])
def test_gradients_do_not_depend_on_micro_batching(make_run, tiny, tmp_path, loss):
    """One step as 1 micro-batch of 8 rollouts or as 4 of 2 gives the same gradient (the loss is normalised
    by the step's token count, not per micro-batch)."""
    grads = []
    for micro in (8, 2):
        L.seed_everything(0)
        rec = Recorder(grads=True)
        trainer, module, data = make_run(
            root=tmp_path / str(micro),
            model={"micro_batch_size": micro, "loss": loss, "max_grad_norm": None, "beta": 0.5},
            data={"batch_size": 4, "rollout": {"num_generations": 2}},
            callbacks=[rec],
            max_steps=1,
        )
        trainer.fit(module, data)
        grads.append(rec.grads[0])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("loss", ["jsd", "topk", "sampled_token"])
def test_token_budget_micro_batches_give_the_one_micro_batch_gradient(make_run, tiny, tmp_path, loss):
    """Micro-batches formed by a token budget (rows of similar length together, padding trimmed) give the gradient
    of one micro-batch holding the whole step, to 1e-6."""
    grads, parts = [], []
    for name, model in (("whole", {"micro_batch_size": 8}), ("budget", {"micro_batch_tokens": 120})):
        L.seed_everything(0)
        rec = Recorder(grads=True)
        trainer, module, data = make_run(
            root=tmp_path / name,
            model={**model, "loss": loss, "max_grad_norm": None, "beta": 0.5},
            data={"batch_size": 4, "rollout": {"num_generations": 2, "max_new_tokens": 16}},
            callbacks=[rec],
            max_steps=1,
        )
        module.configure_model()
        # The random tiny student rarely draws its end token: declaring 60 more end tokens gives rollouts of
        # varied lengths, which is what a token budget groups.
        module.student.generation_config.eos_token_id = list(range(100, 160))
        seen = []
        token_losses = module.token_losses

        def spy(seqs, token_losses=token_losses, seen=seen):
            seen.append((len(seqs), seqs.student_ids.shape[1], seqs.response_mask.sum(-1).tolist()))
            return token_losses(seqs)

        module.token_losses = spy
        trainer.fit(module, data)
        grads.append(rec.grads[0])
        parts.append(seen)
    (whole,) = parts[0]
    assert whole[0] == 8 and len(set(whole[2])) > 2  # one micro-batch of 8 rows of varied response lengths
    assert len(parts[1]) > 1 and sum(rows for rows, _, _ in parts[1]) == 8  # the budget splits the step
    assert all(rows * width <= 120 or rows == 1 for rows, width, _ in parts[1])
    assert sorted(n for _, _, lengths in parts[1] for n in lengths) == sorted(whole[2])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=0, msg=name)


def test_teacher_equal_to_student_gives_zero_loss(make_run, tiny, tmp_path):
    rec = Recorder()
    trainer, module, data = make_run(model={"teacher": tiny["student"], "beta": 0.5}, callbacks=[rec], max_steps=1)
    trainer.fit(module, data)
    assert abs(rec.losses[1]) < 1e-6


def test_distinct_teacher_gives_positive_loss_and_checkpoint_holds_no_teacher(make_run, tiny, tmp_path):
    rec = Recorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer, module, data = make_run(callbacks=[rec, ckpt], enable_checkpointing=True, max_steps=1)
    trainer.fit(module, data)
    assert rec.losses[1] > 1e-3
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    assert state and not any(k.startswith("teacher.") for k in state)
    assert any(k.startswith("student.") for k in state)


def test_resumed_run_gives_the_same_next_losses(make_run, tiny, tmp_path):
    """Stop after step 2, resume from its checkpoint: steps 3 and 4 match the uninterrupted run."""
    full = Recorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer, module, data = make_run(
        root=tmp_path / "a", callbacks=[full, ckpt], enable_checkpointing=True, max_steps=4
    )
    trainer.fit(module, data)

    resumed = Recorder()
    trainer, module, data = make_run(root=tmp_path / "b", callbacks=[resumed], max_steps=4)
    trainer.fit(module, data, ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt"))
    assert sorted(resumed.losses) == [3, 4]
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-5, abs=1e-7)


def test_resume_continues_the_data_order(make_run, tiny, tmp_path):
    """The resumed run sees the prompts the uninterrupted run would have seen next."""
    seen_full, seen_resumed = [], []

    class Seen(L.Callback):
        def __init__(self, out):
            self.out = out

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.out.append(batch.index.tolist())

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer, module, data = make_run(
        root=tmp_path / "a", callbacks=[Seen(seen_full), ckpt], enable_checkpointing=True, max_steps=4
    )
    trainer.fit(module, data)
    trainer, module, data = make_run(root=tmp_path / "b", callbacks=[Seen(seen_resumed)], max_steps=4)
    trainer.fit(module, data, ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt"))
    assert seen_resumed == seen_full[2:]


@pytest.mark.parametrize(
    ("weights", "lora"), [("initial", None), ("initial", LoraOptions(r=4, alpha=8)), ("live", None), ("ema", None)]
)
def test_shared_teacher_opsd(make_run, tiny, tmp_path, weights, lora):
    """OPSD: the student scores itself under the privileged context; the loss is positive (the contexts
    differ) and finite, and only the student's trainable weights change."""
    rec = Recorder()
    trainer, module, data = make_run(
        model={"teacher": None, "teacher_kind": "shared", "shared_weights": weights, "lora": lora},
        data={"teacher_context": "privileged"},
        callbacks=[rec],
        max_steps=2,
    )
    trainer.fit(module, data)
    assert all(torch.isfinite(torch.tensor(v)) and v > 0 for v in rec.losses.values())
    if weights == "initial" and lora is None:
        # The frozen copy keeps the starting weights while the student moves.
        moved = [not torch.equal(p, q) for p, q in zip(module.student.parameters(), module.teacher.parameters())]
        assert any(moved)
    if weights == "initial" and lora is not None:
        assert module.teacher is None
        trainable = [n for n, p in module.student.named_parameters() if p.requires_grad]
        assert trainable and all("lora_" in n for n in trainable)


class WrittenMetrics(Logger):
    """A logger that keeps the metric names written at each step (and, optionally, the values)."""

    def __init__(self, values: bool = False) -> None:
        super().__init__()
        self.written: dict[int, set[str]] = {}
        self.values: list[dict[str, float]] = []  # every write's values, in order, when ``values``
        self.keep_values = values

    name, version = "written", 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.written.setdefault(step, set()).update(metrics)
        if self.keep_values:
            self.values.append(dict(metrics))


class LoggedNames(L.Callback):
    """The names the module passes to ``self.log`` in each batch, in batch order."""

    def __init__(self) -> None:
        self.batches: list[set[str]] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        log = pl_module.log

        def spy(name, *args, **kwargs):
            self.batches[-1].add(name)
            return log(name, *args, **kwargs)

        pl_module.log = spy

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append(set())


def test_step_statistics_are_logged_on_the_steps_the_logger_writes(make_run, tiny, tmp_path):
    """With log_every_n_steps=2, batches 1 and 3 log every statistic; batches 0 and 2 log train/loss only."""
    logger, names, rec = WrittenMetrics(), LoggedNames(), Recorder()
    trainer, module, data = make_run(callbacks=[names, rec], max_steps=4, logger=logger, log_every_n_steps=2)
    trainer.fit(module, data)
    statistics = {"train/loss", "train/grad_norm", "train/token_loss_std", "train/lr", "perf/rollout_seconds"}
    assert len(names.batches) == 4
    assert names.batches[0] == names.batches[2] == {"train/loss"}
    assert statistics <= names.batches[1] and statistics <= names.batches[3]
    assert len(logger.written) == 2
    assert all(statistics <= written for written in logger.written.values())
    assert sorted(rec.losses) == [1, 2, 3, 4]  # train/loss reaches the callbacks after every step
    assert len(set(rec.losses.values())) == 4


def test_grad_norm_is_logged_before_clipping(make_run, tiny, tmp_path):
    """train/grad_norm is the float64 norm of the unclipped gradients; the optimizer sees them clipped."""
    for max_norm in (1e9, 1e-3):
        logger, rec = WrittenMetrics(values=True), Recorder(grads=True)
        trainer, module, data = make_run(
            root=tmp_path / str(max_norm), model={"max_grad_norm": max_norm}, callbacks=[rec], logger=logger
        )
        trainer.fit(module, data)
        for step, grads in enumerate(rec.grads):
            norm = torch.cat([g.double().flatten() for g in grads.values()]).norm().item()
            logged = logger.values[step]["train/grad_norm"]
            if max_norm > 1:
                assert logged == pytest.approx(norm, rel=1e-5)
            else:  # clip_grad_norm_ scales by max_norm / (norm + 1e-6)
                assert logged > 2 * max_norm
                assert norm == pytest.approx(logged * max_norm / (logged + 1e-6), rel=1e-5)


def test_gradient_checkpointing_gives_the_same_step_and_lets_the_monitor_take_gradients(make_run, tiny, tmp_path):
    from trd_lightning import GradientFragmentationMonitor

    runs = {}
    for flag in (False, True):
        rec = Recorder(grads=True)
        monitor = GradientFragmentationMonitor(every_n_steps=1, num_sequences=2)
        trainer, module, data = make_run(
            root=tmp_path / str(flag), model={"gradient_checkpointing": flag}, callbacks=[monitor, rec], max_steps=1
        )
        trainer.fit(module, data)
        assert all(layer.gradient_checkpointing for layer in module.student.model.layers) == flag
        assert "frag/coherence/y_o" in monitor.history[0]
        runs[flag] = rec
    assert runs[True].losses[1] == pytest.approx(runs[False].losses[1], rel=1e-6)
    for key, grad in runs[False].grads[0].items():
        torch.testing.assert_close(runs[True].grads[0][key], grad, atol=1e-7, rtol=1e-5, msg=key)
