"""Distillation fits on the tiny models for tests/test_fsdp.py: in one process, or sharded under torchrun.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_worker.py SPEC.json OUT.json

SPEC.json holds the tiny model and data paths, a root folder and a list of runs. Each run has a ``name``, ``model``
and ``data`` overrides, ``strategy`` (FSDP2Strategy arguments, or null for one process) and ``max_steps``; optionally
``save_every`` (checkpoint every n steps into ``<root>/<name>``), ``refine_prob`` (a RefinementScheduler refining that
share of the rollouts), ``stop_after`` (stop after that step, keeping the
learning-rate schedule of ``max_steps``), ``resume`` (a checkpoint path), ``export`` (``merged`` or ``adapter``:
ExportStudent into ``<root>/<name>/export``) and ``trainer`` (more Trainer arguments).
The runs share the processes, one after the other. Rank 0 writes each run's per-step ``train/loss`` and a few facts
(are the models sharded, what does the optimizer hold, in which dtype does the student compute) to OUT.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L
import torch
from helpers import data_options
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.distributed.tensor import DTensor

from trd_lightning import (
    DistillationModule,
    ExportStudent,
    FSDP2Strategy,
    LoraOptions,
    OnPolicyDataModule,
    RefinementScheduler,
)


class Record(L.Callback):
    """Per-step losses, facts about the models and the optimizer, and an early stop after ``stop_after`` steps."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.losses: dict[int, float] = {}
        self.facts: dict = {}
        self.stop_after = stop_after

    def on_train_start(self, trainer, pl_module) -> None:
        student, teacher = pl_module.student, pl_module.teacher
        in_optimizer = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        self.facts.update(
            student_sharded=all(isinstance(p, DTensor) for p in student.parameters()),
            teacher_sharded=None if teacher is None else all(isinstance(p, DTensor) for p in teacher.parameters()),
            optimizer_only_student=in_optimizer == {id(p) for p in student.parameters() if p.requires_grad},
            weight_dtype=str(next(student.parameters()).dtype),
            checkpointed_layers=all(layer.gradient_checkpointing for layer in student.get_decoder().layers),
        )

        def compute_dtype(module, args, output) -> None:
            if torch.is_grad_enabled():
                self.facts["compute_dtype"] = str(output.last_hidden_state.dtype)

        student.get_decoder().register_forward_hook(compute_dtype)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(trainer.callback_metrics["train/loss"])
        refined = trainer.strategy.all_gather(batch.produced.refined.sum()).reshape(-1).tolist()
        self.facts.setdefault("refined_per_rank", []).append(refined)
        if trainer.global_step == self.stop_after:
            trainer.should_stop = True

    def on_validation_end(self, trainer, pl_module) -> None:
        self.facts["val_accuracy"] = float(trainer.callback_metrics["val/accuracy"])

    def on_train_end(self, trainer, pl_module) -> None:
        self.facts["optimizer_states"] = len(trainer.optimizers[0].state)


def fit(tiny: dict, root: str, run: dict) -> Record:
    """One run; the single-process and the sharded form differ only in the strategy and the per-device batch."""
    # Every process draws the same new weights (the LoRA adapter's), as one process does.
    L.seed_everything(0)
    record = Record(run.get("stop_after"))
    model = {
        "student": tiny["student"],
        "teacher": tiny["teacher"],
        "micro_batch_size": 2,
        "loss_chunk_size": 16,
        "lr": 1e-3,
        "warmup_ratio": 0.0,
        **run.get("model", {}),
    }
    if model.get("lora"):
        model["lora"] = LoraOptions(**model["lora"])
    defaults = {
        "batch_size": 8,
        "rollout": {"max_new_tokens": 12, "temperature": 0.0},
        "refine": {"max_prompt_length": 400, "temperature": 0.0},
    }
    overrides = run.get("data", {})
    groups = {k: {**v, **overrides.get(k, {})} for k, v in defaults.items() if isinstance(v, dict)}
    data = data_options(tiny, {**defaults, **overrides, **groups})
    callbacks = [record]
    if run.get("refine_prob") is not None:
        callbacks.append(RefinementScheduler(p_start=run["refine_prob"], p_end=run["refine_prob"]))
    if run.get("save_every"):
        callbacks.append(
            ModelCheckpoint(
                dirpath=os.path.join(root, run["name"]),
                every_n_train_steps=run["save_every"],
                save_top_k=-1,
                filename="{step}",
            )
        )
    if run.get("export"):
        callbacks.append(ExportStudent(os.path.join(root, run["name"], "export"), merge_lora=run["export"] == "merged"))
    if run.get("strategy") is None:
        devices, strategy = 1, "auto"
    else:
        devices, strategy = 2, FSDP2Strategy(process_group_backend="gloo", **run["strategy"])
        # The same prompts per step as one process with the whole batch: each rank takes half.
        data["batch_size"] //= devices
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        default_root_dir=root,
        max_steps=run["max_steps"],
        logger=False,
        enable_checkpointing=bool(run.get("save_every")),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **run.get("trainer", {}),
    )
    trainer.fit(DistillationModule(**model), OnPolicyDataModule(**data), ckpt_path=run.get("resume"))
    return record


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    results = {}
    for run in spec["runs"]:
        record = fit(spec["tiny"], spec["root"], run)
        results[run["name"]] = {"losses": record.losses, "facts": record.facts}
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
