"""A run that fails before it has logged anything leaves no empty version folder behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L

# What a logger leaves in a run that measured nothing: the saved settings, and event files without scalars (the
# header, the config as text).
SETTINGS = {"hparams.yaml", "config.yaml"}


class DropEmptyRun(L.Callback):
    """On an exception before the first optimizer step, remove the loggers' version folders that this run created
    and that hold nothing but settings and event files without a scalar (e.g. a data file that cannot be read).

    The ``trd`` command adds it. A folder that existed before the run (a resumed run) is never touched.
    """

    def __init__(self) -> None:
        self._created: list[tuple[Path, Path]] = []  # (the version folder, its outermost folder made by the run)

    def note(self, trainer: L.Trainer) -> None:
        """Remember the loggers' folders that do not exist yet (call before the run starts)."""
        for logger in trainer.loggers:
            folder = getattr(logger, "log_dir", None)
            if not folder or Path(folder).exists():
                continue
            folder = Path(folder).absolute()
            top = folder
            while not top.parent.exists():
                top = top.parent
            self._created.append((folder, top))

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.global_step > 0 or not trainer.is_global_zero:
            return
        for folder, top in self._created:
            if not folder.is_dir() or not all(_empty(f) for f in folder.iterdir()):
                continue
            shutil.rmtree(folder, ignore_errors=True)
            while folder != top and not any(folder.parent.iterdir()):  # the empty folders above it, made by the run
                folder = folder.parent
                folder.rmdir()


def _empty(path: Path) -> bool:
    if path.name in SETTINGS:
        return True
    return path.is_file() and path.name.startswith("events.out.tfevents") and not _has_scalars(path)


def _has_scalars(events: Path) -> bool:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    try:
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value:
                if value.HasField("simple_value") or value.metadata.plugin_data.plugin_name == "scalars":
                    return True
    except Exception:  # unreadable: keep it
        return True
    return False
