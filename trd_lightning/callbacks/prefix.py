"""PrefixFailureMonitor: how torn is the teacher along the student's rollouts, and where do they go wrong?

Needs a module that implements ``TokenStatistics`` (DistillationModule does), and uses ``DiagnosticViews`` when
present: see ``trd_lightning.callbacks.protocol``.
"""

from __future__ import annotations

import math

import lightning as L
import torch

from trd_lightning.callbacks.periodic import PeriodicBatchCallback, suffix
from trd_lightning.callbacks.protocol import TokenStatistics
from trd_lightning.diagnostics import first_divergence, prefix_stats
from trd_lightning.media import log_figure, log_histogram


class PrefixFailureMonitor(PeriodicBatchCallback):
    """Every ``every_n_steps`` optimizer steps, on up to ``num_sequences`` rollouts per view, logs:

    - ``teacher/bimodal_frac``: the share of response positions where the teacher's top-2 probabilities both
      exceed ``tau``; ``teacher/entropy``: the teacher's mean entropy per position;
    - ``prefix/first_divergence``: where rollouts first diverge (the first token whose teacher log-prob is below
      ``divergence_logprob``), as a fraction of their length, over the rollouts that diverge;
      ``prefix/diverged_frac``: the share that diverge;
    - ``prefix/kl_before``, ``prefix/kl_after``: the mean per-token KL(teacher || student) before the first
      divergence and from it on;
    - a histogram of the per-token KL (``teacher/token_kl``) and, every ``figure_every_n_steps``, a figure of the
      first rollout of each view (paired, for ``y_o`` and ``y_r``): the teacher's top-1 and top-2 probabilities
      and the per-token KL along it, the first divergence marked.

    Each is logged per view (``/y_o``, ``/y_r``).

    Args:
        every_n_steps: measure on the steps where ``global_step % every_n_steps == 0``.
        num_sequences: rollouts measured per view (the first ones of the batch).
        tau: the bimodality threshold.
        divergence_logprob: the teacher log-prob under which a token starts the divergence.
        figure_every_n_steps: how often to draw the figure (a multiple of ``every_n_steps``; None: never).
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        num_sequences: int = 32,
        tau: float = 0.2,
        divergence_logprob: float = math.log(0.05),
        figure_every_n_steps: int | None = 50,
    ) -> None:
        super().__init__(every_n_steps)
        if figure_every_n_steps is not None and figure_every_n_steps % every_n_steps:
            raise ValueError(
                f"figure_every_n_steps={figure_every_n_steps} must be a multiple of every_n_steps={every_n_steps}."
            )
        self.num_sequences = num_sequences
        self.tau = tau
        self.divergence_logprob = divergence_logprob
        self.figure_every_n_steps = figure_every_n_steps

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule, batch) -> None:
        if not isinstance(pl_module, TokenStatistics):
            raise TypeError(
                f"{type(pl_module).__name__} has no token_statistics(batch, rows): PrefixFailureMonitor needs it "
                "(see trd_lightning.callbacks.protocol)."
            )
        drawn = {}
        for name, view in self.views(pl_module, batch).items():
            grids, mask = pl_module.token_statistics(view, slice(0, self.num_sequences))
            if not mask.any():
                continue
            first = first_divergence(grids["teacher_token_logprob"], mask, self.divergence_logprob)
            stats = prefix_stats(grids, mask, first, self.tau)
            metrics = {
                f"teacher/bimodal_frac{suffix(name)}": stats["bimodal_frac"],
                f"teacher/entropy{suffix(name)}": stats["entropy"],
                f"prefix/first_divergence{suffix(name)}": stats["first_divergence"],
                f"prefix/diverged_frac{suffix(name)}": stats["diverged_frac"],
                f"prefix/kl_before{suffix(name)}": stats["kl_before"],
                f"prefix/kl_after{suffix(name)}": stats["kl_after"],
            }
            self.log_finite(trainer, metrics)
            log_histogram(trainer, f"teacher/token_kl{suffix(name)}", grids["kl"][mask], trainer.global_step)
            drawn[name] = ({k: v[0][mask[0]].float().cpu() for k, v in grids.items()}, int(first[0]))
        figure_due = self.figure_every_n_steps and trainer.global_step % self.figure_every_n_steps == 0
        if drawn and figure_due:
            figure = rollout_figure(drawn, self.tau)
            log_figure(trainer, "prefix/rollout", figure, trainer.global_step)
            _close(figure)


def rollout_figure(rows: dict[str, tuple[dict[str, torch.Tensor], int]], tau: float):
    """One panel per view: teacher top-1/top-2 probabilities and per-token KL along a rollout, divergence marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 2.6 * len(rows)), squeeze=False)
    for ax, (name, (grid, first)) in zip(axes[:, 0], rows.items()):
        positions = range(len(grid["kl"]))
        ax.plot(positions, grid["teacher_top1"], label="teacher top-1 p", color="tab:blue")
        ax.plot(positions, grid["teacher_top2"], label="teacher top-2 p", color="tab:orange")
        ax.axhline(tau, color="tab:orange", linestyle=":", linewidth=1)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("probability")
        kl_axis = ax.twinx()
        kl_axis.bar(positions, grid["kl"], color="tab:red", alpha=0.3, label="KL(teacher || student)")
        kl_axis.set_ylabel("per-token KL")
        if first >= 0:
            ax.axvline(first, color="black", linestyle="--", label="first divergence")
        ax.set_title(name or "rollout")
        ax.set_xlabel("response position")
        handles = ax.get_legend_handles_labels()[0] + kl_axis.get_legend_handles_labels()[0]
        ax.legend(handles=handles, fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


def _close(figure) -> None:
    import matplotlib.pyplot as plt

    plt.close(figure)
