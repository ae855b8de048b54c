"""Validation before the first step and after the last, so curves start from the untrained student and end at the
trained one."""

from __future__ import annotations

import lightning as L


def _run_validation(trainer: L.Trainer) -> None:
    loop = trainer.fit_loop.epoch_loop.val_loop
    trainer.validating = True
    loop.run()
    trainer.training = True


class ValidateAtStart(L.Callback):
    """Run the validation loop once before training starts (not on resume), logged at step 0."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0 or trainer.sanity_checking:
            return
        _run_validation(trainer)


class ValidateAtEnd(L.Callback):
    """Run the validation loop once more when training ends, unless the last validation was at the last step: a run
    shorter than ``val_check_interval``, or one that stops between two intervals, still ends with a validation of the
    student it trained. The ``trd`` command adds it to every fit."""

    def __init__(self) -> None:
        self._validated_at: int | None = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated_at = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._validated_at:
            _run_validation(trainer)
