"""The step-counting progress bar, the CLI's default, and the summary that closes a fit."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.callbacks import TQDMProgressBar
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_cli import demo_on_tiny

from trd_lightning.callbacks.progress import StepProgressBar
from trd_lightning.cli import cli_main


def fit_args(tiny, tmp_path, *extra: str) -> list[str]:
    return [
        "fit",
        *demo_on_tiny(tiny),
        f"--data.validation.data={tiny['validation']}",
        "--data.validation.split=train",
        "--data.validation.batch_size=8",
        "--data.rollout.max_new_tokens=8",
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=2",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        *extra,
    ]


def test_the_bar_counts_optimizer_steps_toward_max_steps(tiny, tmp_path):
    cli = cli_main(fit_args(tiny, tmp_path))
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, StepProgressBar)  # the config names no progress bar: the CLI adds this one
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (4, 4)  # 4 of 4 steps, not batches of an epoch
    assert bar.train_progress_bar.desc.startswith("Step")
    shown = bar.postfix(cli.trainer)
    metrics = cli.trainer.callback_metrics
    assert shown["loss"] == f"{float(metrics['train/loss']):.4g}"
    assert shown["rollout"] == f"{float(metrics['perf/rollout_fraction']):.0%}"
    assert shown["val/accuracy"] == f"{float(metrics['val/accuracy']):.4g}"


def test_the_summary_names_first_and_last_validation_the_export_and_tensorboard(tiny, tmp_path):
    cli = cli_main(fit_args(tiny, tmp_path))
    run = Path(cli.trainer.logger.log_dir)
    events = EventAccumulator(str(run))
    events.Reload()
    curve = events.Scalars("val/response_length")  # validated at the start, after step 2 and after step 4
    assert len(curve) == 3
    summary = cli.trainer.progress_bar_callback.summary(cli.trainer)
    lines = summary.splitlines()
    assert lines[0].startswith("[trd] fit done: 4 optimizer steps in ")
    first, last = curve[0].value, curve[-1].value
    assert f"  val/response_length: {first:.4g} before training -> {last:.4g} after 4 steps" in lines
    assert f"  student exported to {run / 'student'}" in lines and (run / "student" / "config.json").exists()
    assert f"  curves: tensorboard --logdir {run}" in lines


def test_a_configured_progress_bar_is_kept(tiny, tmp_path):
    bar = tmp_path / "bar.yaml"
    bar.write_text("trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.TQDMProgressBar\n")
    cli = cli_main(fit_args(tiny, tmp_path, "--config", str(bar))[1:], run=False)  # instantiate only: no subcommand
    assert type(cli.trainer.progress_bar_callback) is TQDMProgressBar
    assert not any(isinstance(c, StepProgressBar) for c in cli.trainer.callbacks)


def test_no_progress_bar_when_it_is_turned_off(tiny, tmp_path):
    cli = cli_main([*fit_args(tiny, tmp_path)[1:], "--trainer.enable_progress_bar=false"], run=False)
    assert cli.trainer.progress_bar_callback is None


@pytest.mark.parametrize(("monitor", "logged"), [("val/pass@1", True), ("val/missing", False)])
def test_the_bar_shows_the_chosen_metric_when_logged(tiny, tmp_path, monitor, logged):
    bar = tmp_path / "bar.yaml"
    bar.write_text(
        "trainer:\n  callbacks:\n    - class_path: trd_lightning.callbacks.progress.StepProgressBar\n"
        f"      init_args: {{monitor: {monitor}}}\n"
    )
    cli = cli_main([*fit_args(tiny, tmp_path, "--config", str(bar)), "--trainer.max_steps=2"])
    metrics = cli.trainer.callback_metrics
    assert (monitor in metrics) is logged
    shown = cli.trainer.progress_bar_callback.postfix(cli.trainer)
    assert shown.get(monitor) == (f"{float(metrics[monitor]):.4g}" if logged else None)
    assert "loss" in shown
