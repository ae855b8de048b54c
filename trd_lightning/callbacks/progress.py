"""A progress bar that counts optimizer steps, and a summary of the run at the end of fit."""

from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from trd_lightning.callbacks.export import ExportStudent


class StepProgressBar(TQDMProgressBar):
    """Counts optimizer steps toward ``trainer.max_steps`` (one batch is one step here, and epochs mean little),
    showing the loss, the share of each step's time spent in rollouts (``perf/rollout_fraction``) and the last value
    of a validation metric. When fit ends it sums the run up: the first and last validation metrics, where the
    student was exported (``ExportStudent``) and how to look at the curves.

    The ``trd`` command adds it unless the config names another progress bar.

    Args:
        refresh_rate: redraw every this many steps.
        monitor: the validation metric shown on the bar (when it has been logged).
        process_position: the bar's line, for several trainers side by side.
    """

    def __init__(self, refresh_rate: int = 1, monitor: str = "val/accuracy", process_position: int = 0) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position)
        self.monitor = monitor
        self.first_val: tuple[int, dict[str, float]] | None = None
        self.last_val: tuple[int, dict[str, float]] | None = None
        self._start = 0.0

    @property
    def train_description(self) -> str:
        return "Step"

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.monotonic()
        bar = self.init_train_tqdm()
        bar.unit = "step"
        bar.reset(total=_total_steps(trainer))
        bar.n = bar.initial = trainer.global_step  # a resumed run starts where it left off
        self.train_progress_bar = bar
        bar.set_postfix(self.postfix(trainer))

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        """Nothing: the bar runs across epochs."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if self._should_update(trainer.global_step, bar.total):
            bar.n = trainer.global_step
            bar.set_postfix(self.postfix(trainer))  # refreshes the bar

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Nothing: the bar runs across epochs."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.val_progress_bar.close()
        self.reset_dataloader_idx_tracker()
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
        if metrics:
            self.last_val = (trainer.global_step, metrics)
            self.first_val = self.first_val or self.last_val
        if self._train_progress_bar is not None and trainer.state.fn == "fit":
            self.train_progress_bar.set_postfix(self.postfix(trainer))

    def postfix(self, trainer: L.Trainer) -> dict[str, str]:
        """What the bar shows beside the count: the loss, the rollout share and the monitored metric."""
        metrics = trainer.callback_metrics
        shown = {}
        if "train/loss" in metrics:
            shown["loss"] = f"{float(metrics['train/loss']):.4g}"
        if "perf/rollout_fraction" in metrics:
            shown["rollout"] = f"{float(metrics['perf/rollout_fraction']):.0%}"
        if self.last_val and self.monitor in self.last_val[1]:
            shown[self.monitor] = f"{self.last_val[1][self.monitor]:.4g}"
        return shown

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Callbacks' teardown runs after every on_fit_end, so the export has been written by now.
        if stage == "fit" and not trainer.interrupted:
            rank_zero_info(self.summary(trainer))

    def summary(self, trainer: L.Trainer) -> str:
        """The closing lines of a fit."""
        minutes, seconds = divmod(int(time.monotonic() - self._start), 60)
        lines = [f"[trd] fit done: {trainer.global_step} optimizer steps in {minutes}:{seconds:02d}"]
        if self.first_val is not None:
            (first_step, first), (last_step, last) = self.first_val, self.last_val
            for name in sorted(set(first) & set(last)):
                before = f"{first[name]:.4g} {_when(first_step)} -> " if first_step != last_step else ""
                lines.append(f"  {name}: {before}{last[name]:.4g} {_when(last_step)}")
        for callback in trainer.callbacks:
            if isinstance(callback, ExportStudent):
                lines.append(f"  student exported to {callback.target(trainer)}")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                lines.append(f"  curves: tensorboard --logdir {logger.log_dir}")
            elif isinstance(logger, CSVLogger):
                lines.append(f"  metrics: {logger.experiment.metrics_file_path}")
        return "\n".join(lines)


def _when(step: int) -> str:
    return "before training" if step == 0 else f"after {step} steps"


def _total_steps(trainer: L.Trainer) -> int | None:
    if trainer.max_steps > 0:
        return trainer.max_steps
    return convert_inf(trainer.estimated_stepping_batches)
