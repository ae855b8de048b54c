"""Rollouts as text in TensorBoard."""

from __future__ import annotations

import html

import lightning as L


class RolloutSamples(L.Callback):
    """Every ``every_n_steps`` optimizer steps, log a few rollouts as text: the problem, the student's rollout
    and, under TRD, its refinement beside it.

    Args:
        every_n_steps: how often, in optimizer steps.
        num_samples: rollouts shown each time.
    """

    def __init__(self, every_n_steps: int = 20, num_samples: int = 2) -> None:
        if every_n_steps < 1 or num_samples < 1:
            raise ValueError("RolloutSamples needs every_n_steps >= 1 and num_samples >= 1.")
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        step, produced = trainer.global_step, getattr(batch, "produced", None)
        if (step - 1) % self.every_n_steps or produced is None:
            return
        blocks = []
        for i in range(min(self.num_samples, len(produced.rollout_text))):
            j = i // produced.num_generations
            block = (
                f"**problem** (answer: {batch.answer[j]})\n<pre>{html.escape(batch.problem[j])}</pre>\n\n"
                f"**rollout y_o**\n<pre>{html.escape(produced.rollout_text[i])}</pre>"
            )
            if produced.refined_text[i] is not None:
                block += f"\n\n**refined y_r** (trained on)\n<pre>{html.escape(produced.refined_text[i])}</pre>"
            blocks.append(block)
        for logger in trainer.loggers:
            if hasattr(logger.experiment, "add_text"):
                logger.experiment.add_text("samples/rollout", "\n\n---\n\n".join(blocks), global_step=step)
