"""A run whose service fails past its retries stops with a checkpoint, so that nothing is lost."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L

from trd_lightning.serve.options import ServiceError

log = logging.getLogger(__name__)


class ServiceFailureCheckpoint(L.Callback):
    """On a ``ServiceError`` (a served teacher or refiner gone, or too slow past its retries), write a checkpoint of
    the last completed step before the run stops; resuming from it (``--ckpt_path``) continues as the uninterrupted
    run would have (every rollout is seeded by its step and row). The module adds it when a service is set.

    Args:
        dirpath: where the checkpoint goes; None: the ``ModelCheckpoint``'s folder, else ``checkpoints`` in the
            run's log folder.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.path: Path | None = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Only once training batches run: a failure of the start checks has nothing to save.
        started = trainer.fit_loop.epoch_loop.batch_progress.total.ready > 0
        if not isinstance(exception, ServiceError) or not trainer.training or not started:
            return
        # The failing step has not changed the weights, the optimizer or the data order: this is the state after
        # the last completed step, which a resumed run continues from.
        folder = self.dirpath or getattr(trainer.checkpoint_callback, "dirpath", None)
        folder = Path(folder or Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints")
        self.path = folder / f"service-failure-step={trainer.global_step}.ckpt"
        trainer.save_checkpoint(self.path)
        if trainer.is_global_zero:
            log.error(
                "The service at %s failed: %s\nSaved the state after step %d to %s; once the service is back, "
                "resume with --ckpt_path %s",
                exception.url, exception, trainer.global_step, self.path, self.path,
            )  # fmt: skip


def service_callbacks(trainer: L.Trainer, served_teacher: bool) -> list[L.Callback]:
    """A ``ServiceFailureCheckpoint`` for a run with a served teacher, refiner or student engine, unless it has one
    already."""
    data = getattr(trainer, "datamodule", None)
    served = served_teacher or any(getattr(data, name, False) for name in ("serves_refiner", "serves_rollouts"))
    present = any(isinstance(c, ServiceFailureCheckpoint) for c in trainer.callbacks)
    return [ServiceFailureCheckpoint()] if served and not present else []
