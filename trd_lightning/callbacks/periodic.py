"""The shared timing of the diagnostic callbacks: measure one step's batch every N optimizer steps."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import lightning as L

from trd_lightning.callbacks.protocol import DiagnosticViews
from trd_lightning.media import log_scalars


class PeriodicBatchCallback(L.Callback, ABC):
    """Calls ``measure(trainer, pl_module, batch)`` on the steps where ``global_step % every_n_steps == 0``.

    The batch is taken at ``on_train_batch_start`` and measured at ``on_before_optimizer_step``: by then a module
    that builds its batch in place in its own ``on_train_batch_start`` (as DistillationModule does) has filled
    it, and the weights are still those the step's gradient was computed with.

    The measurements go to the trainer's loggers at the step they were taken, and only then (``self.log`` would
    repeat a manual-optimization module's last value at every later step); ``history`` keeps them by step.
    """

    def __init__(self, every_n_steps: int) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.history: dict[int, dict[str, float]] = {}
        self._batch = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._batch = batch if trainer.global_step % self.every_n_steps == 0 else None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if self._batch is None:
            return
        batch, self._batch = self._batch, None
        self.measure(trainer, pl_module, batch)

    @abstractmethod
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule, batch) -> None:
        """Measure ``batch`` and log the results (called on the due steps only)."""

    @staticmethod
    def views(pl_module: L.LightningModule, batch) -> dict:
        """The module's named views of the batch (``diagnostic_views``), or the batch itself under no name."""
        if isinstance(pl_module, DiagnosticViews):
            return pl_module.diagnostic_views(batch)
        return {"": batch}

    def log_finite(self, trainer: L.Trainer, metrics: dict[str, float]) -> None:
        """Log the metrics that have a value (NaN marks one with nothing to average, e.g. no diverging row), at this
        step only."""
        finite = {k: float(v) for k, v in metrics.items() if not math.isnan(v)}
        if finite:
            self.history.setdefault(trainer.global_step, {}).update(finite)
            log_scalars(trainer, finite, trainer.global_step)


def suffix(view: str) -> str:
    """The metric-name suffix of a view: ``/y_o`` for ``y_o``, nothing for the unnamed view."""
    return f"/{view}" if view else ""
