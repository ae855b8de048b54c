"""Validation before the first step, so curves start from the untrained student."""

from __future__ import annotations

import lightning as L


class ValidateAtStart(L.Callback):
    """Run the validation loop once before training starts (not on resume), logged at step 0."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0 or trainer.sanity_checking:
            return
        loop = trainer.fit_loop.epoch_loop.val_loop
        trainer.validating = True
        loop.run()
        trainer.training = True
