"""Exporting the trained student as a Hugging Face model folder."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from trd_lightning.io import atomic_dir
from trd_lightning.teacher import is_peft


class ExportStudent(L.Callback):
    """At the end of fit, write the student with ``save_pretrained`` (and its tokenizer), atomically.

    Args:
        dirpath: the export folder; defaults to ``<log_dir>/student``.
        merge_lora: with a LoRA student, merge the adapter into the weights (a plain model) instead of
            writing the adapter alone.
    """

    def __init__(self, dirpath: str | None = None, merge_lora: bool = True) -> None:
        self.dirpath = dirpath
        self.merge_lora = merge_lora

    def target(self, trainer: L.Trainer) -> Path:
        return Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "student")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        model = pl_module.student
        if is_peft(model) and self.merge_lora:
            model = copy.deepcopy(model).merge_and_unload()
        target = self.target(trainer)
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp)
            trainer.datamodule.tokenizer.save_pretrained(tmp)
        rank_zero_info(f"[trd] student exported to {target}")
