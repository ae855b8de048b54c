"""The metrics of validation and test: accuracy, avg@k, unbiased pass@k and answer length."""

from __future__ import annotations

from torch import nn
from torchmetrics import MeanMetric

from trd_lightning.metrics import AvgAtK, PassAtK
from trd_lightning.rollout.batch import ValidationRollouts


class EvalMetrics(nn.Module):
    """``{prefix}/accuracy``, ``{prefix}/avg@k``, ``{prefix}/pass@k`` and ``{prefix}/response_length``.

    Args:
        prefix: the metric namespace (``val`` or ``test``).
        k: answers sampled per prompt.
    """

    def __init__(self, prefix: str, k: int) -> None:
        super().__init__()
        self.prefix, self.k = prefix, k
        self.accuracy, self.length = MeanMetric(), MeanMetric()
        self.avg_at_k, self.pass_at_k = AvgAtK(), PassAtK(k)

    def update(self, out: ValidationRollouts) -> None:
        self.length.update(out.lengths)
        if out.correct is not None:
            self.accuracy.update(out.correct.float())
            self.avg_at_k.update(out.correct)
            self.pass_at_k.update(out.correct)

    def loggable(self, verified: bool) -> dict[str, MeanMetric]:
        """The metric objects to hand to ``LightningModule.log_dict`` (the answer metrics only when verified)."""
        metrics = {f"{self.prefix}/response_length": self.length}
        if verified:
            metrics.update(
                {
                    f"{self.prefix}/accuracy": self.accuracy,
                    f"{self.prefix}/avg@{self.k}": self.avg_at_k,
                    f"{self.prefix}/pass@{self.k}": self.pass_at_k,
                }
            )
        return metrics
