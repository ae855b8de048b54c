"""Building a Trainer run on the tiny fixtures (the ``make_run`` fixture of conftest.py), callbacks that record
what the tests check, and running the ``trd`` command as a program."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

from trd_lightning import DistillationModule, OnPolicyDataModule
from trd_lightning.data.options import PromptOptions, RefineOptions, RolloutOptions, ValidationOptions

GROUPS = {"prompt": PromptOptions, "rollout": RolloutOptions, "refine": RefineOptions, "validation": ValidationOptions}


class Recorder(L.Callback):
    """Records the logged train/loss of every step and, optionally, the gradients before each optimizer step."""

    def __init__(self, grads: bool = False) -> None:
        self.losses: dict[int, float] = {}
        self.grads: list[dict[str, torch.Tensor]] = []
        self.keep_grads = grads

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.keep_grads:
            self.grads.append(
                {n: p.grad.detach().clone() for n, p in pl_module.student.named_parameters() if p.grad is not None}
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(trainer.callback_metrics["train/loss"])


class KeepBatch(L.Callback):
    """Keeps the prompt batch of every step, with the batch produced from it."""

    def __init__(self):
        self.batches = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append(batch)


def data_options(tiny: dict, data: dict | None = None, student: str | None = None) -> dict:
    """The tiny run's DataModule arguments, with ``data``'s entries on top; a group given as a dict (e.g.
    ``{"rollout": {"num_generations": 2}}``) updates that group's tiny defaults."""
    groups = {
        "rollout": {"max_new_tokens": 12},
        "refine": {"max_prompt_length": 400},
        "validation": {"split": None},
    }
    kwargs = {"train_data": tiny["train"], "batch_size": 4, "tokenizer": student or tiny["student"]}
    for key, value in (data or {}).items():
        if key in GROUPS and isinstance(value, dict):
            groups[key] = {**groups.get(key, {}), **value}
        elif key in GROUPS:
            groups[key] = dataclasses.asdict(value)
        else:
            kwargs[key] = value
    return {**kwargs, **{name: GROUPS[name](**values) for name, values in groups.items()}}


def build_run(tiny: dict, root, model: dict | None = None, data: dict | None = None, callbacks=(), **trainer_kw):
    """A (trainer, module, datamodule) triple on the tiny models and data, CPU, no validation by default; tests take
    it through the ``make_run`` fixture."""
    model_kw = {
        "student": tiny["student"],
        "teacher": tiny["teacher"],
        "micro_batch_size": 4,
        "lr": 1e-3,
        "warmup_ratio": 0.0,
        **(model or {}),
    }
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        default_root_dir=str(root),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        **{"max_steps": 2, "enable_checkpointing": False, "logger": False, "log_every_n_steps": 1, **trainer_kw},
    )
    datamodule = OnPolicyDataModule(**data_options(tiny, data, model_kw["student"]))
    return trainer, DistillationModule(**model_kw), datamodule


def fit_one_step(make_run, model: dict | None = None, data: dict | None = None) -> None:
    """One step of a tiny run with these overrides (what input checks are tested through)."""
    trainer, module, datamodule = make_run(model=model, data=data, max_steps=1)
    trainer.fit(module, datamodule)


def chat_ids(tok, text: str, **kwargs) -> list[int]:
    """A user turn through the chat template, encoded by the tokenizer directly (not through trd_lightning.prompts)."""
    messages = [{"role": "user", "content": text}]
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)["input_ids"])


# ------------------------------------------------------------------ the `trd` command

REPO = Path(__file__).parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
ON_CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto"]


def demo_on_tiny(tiny) -> list[str]:
    """The demo config, on CPU, with the tiny fixtures in place of the demo world."""
    return [
        "--config",
        str(CONFIGS[0].parent / "demo.yaml"),
        *ON_CPU,
        f"--model.student={tiny['student']}",
        f"--model.teacher={tiny['teacher']}",
        "--model.micro_batch_size=4",
        f"--data.train_data={tiny['train']}",
        "--data.batch_size=4",
    ]


def trd(*args: str, cwd=REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    """``trd ARGS`` as a program (``python -m trd_lightning``, importing this checkout)."""
    environ = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "trd_lightning", *args], capture_output=True, text=True, cwd=cwd, env=environ
    )


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve of a TensorBoard run folder: tag -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def readme_block(heading: str, language: str = "python") -> str:
    """The first ``language`` code block under the README's ``heading``, exactly as printed."""
    text = (REPO / "README.md").read_text()
    section = text[text.index(f"\n{heading}\n") :]
    return section.split(f"\n```{language}\n", 1)[1].split("\n```\n", 1)[0] + "\n"
