"""Rollouts as text, in whichever loggers the trainer has (see ``trd_lightning.media``)."""

from __future__ import annotations

import html

import lightning as L

from trd_lightning.media import log_text


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
            parts = [
                f"<p><strong>problem</strong> (answer: {html.escape(str(batch.answer[j]))})</p>",
                f"<pre>{html.escape(batch.problem[j])}</pre>",
                "<p><strong>rollout y_o</strong></p>",
                f"<pre>{html.escape(produced.rollout_text[i])}</pre>",
            ]
            if produced.refined_text[i] is not None:
                parts += [
                    "<p><strong>refined y_r</strong> (trained on)</p>",
                    f"<pre>{html.escape(produced.refined_text[i])}</pre>",
                ]
            blocks.append("\n\n".join(parts))
        log_text(trainer, "samples/rollout", "\n\n<hr>\n\n".join(blocks), step)
