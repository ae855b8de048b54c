"""Text, figures and histograms through the trainer's loggers, each through its own media API.

Scalars go through ``self.log`` as usual, except those measured on some steps only (``log_scalars``, written at
that step and no other). What is not a scalar goes here: TensorBoard gets ``add_text``,
``add_figure`` and ``add_histogram``; Weights & Biases gets ``wandb.Html``, ``wandb.Image`` and
``wandb.Histogram``; MLflow gets ``log_text`` and ``log_figure`` artifacts (named by tag and step). A logger with
no API for a kind of media (CSVLogger, or MLflow for histograms) is skipped, with one notice per logger and kind.
"""

from __future__ import annotations

import weakref

import lightning as L
import torch
from lightning.pytorch.loggers import Logger, MLFlowLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info

_noticed: weakref.WeakKeyDictionary[Logger, set[str]] = weakref.WeakKeyDictionary()


def log_scalars(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    """Write scalars at ``step`` to every logger, once (not repeated at later steps as ``self.log`` values can be)."""
    for logger in _loggers(trainer):
        logger.log_metrics(metrics, step)


def log_text(trainer: L.Trainer, tag: str, html: str, step: int) -> None:
    """Log an HTML fragment (``<p>``, ``<pre>``, ``<strong>``, ``<hr>``: what TensorBoard's text tab renders)."""
    for logger in _loggers(trainer):
        if isinstance(logger, WandbLogger):
            import wandb

            logger.log_metrics({tag: wandb.Html(html)}, step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_text(logger.run_id, html, f"{tag}/step_{step:07d}.html")
        elif hasattr(logger.experiment, "add_text"):
            logger.experiment.add_text(tag, html, global_step=step)
        else:
            _notice(logger, "text", tag)


def log_figure(trainer: L.Trainer, tag: str, figure, step: int) -> None:
    """Log a matplotlib figure (left open: the caller closes it)."""
    for logger in _loggers(trainer):
        if isinstance(logger, WandbLogger):
            logger.log_image(tag, [figure], step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_figure(logger.run_id, figure, f"{tag}/step_{step:07d}.png")
        elif hasattr(logger.experiment, "add_figure"):
            logger.experiment.add_figure(tag, figure, step, close=False)
        else:
            _notice(logger, "figures", tag)


def log_histogram(trainer: L.Trainer, tag: str, values: torch.Tensor, step: int) -> None:
    """Log the distribution of ``values``."""
    for logger in _loggers(trainer):
        if isinstance(logger, WandbLogger):
            import wandb

            logger.log_metrics({tag: wandb.Histogram(values.detach().float().cpu().numpy())}, step)
        elif hasattr(logger.experiment, "add_histogram"):
            logger.experiment.add_histogram(tag, values.detach().float().cpu(), step)
        else:
            _notice(logger, "histograms", tag)


def _loggers(trainer: L.Trainer) -> list[Logger]:
    # Loggers write on rank 0 only (W&B's refuses elsewhere); the callbacks that call here run on every rank.
    return trainer.loggers if trainer.is_global_zero else []


def _notice(logger: Logger, kind: str, tag: str) -> None:
    seen = _noticed.setdefault(logger, set())
    if kind not in seen:
        seen.add(kind)
        rank_zero_info(
            f"[trd] {type(logger).__name__} takes no {kind}: {tag} and the other {kind} are not logged there"
        )
