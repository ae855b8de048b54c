"""What a LightningModule offers the diagnostic monitors: four small protocols, one required and three optional.

- ``SequenceLosses`` (required by ``GradientFragmentationMonitor``): ``sequence_token_losses(batch, rows)`` gives the
  [n, L] per-token losses of the batch's ``rows`` with the autograd graph attached (0 off the mask), and the [n, L]
  bool mask of the tokens that count. A sequence's gradient is that of the sum of its token losses, i.e. its share
  of the step's gradient. The monitor asks for one row at a time (``slice(i, i + 1)``) and stops at the first empty
  answer.
- ``DiagnosticViews``: ``diagnostic_views(batch)`` gives named sets of sequences measured separately, each logged
  with ``/name`` after the metric (DistillationModule: ``y_o`` and, on refined steps, ``y_r``).
- ``TokenStatistics`` (required by ``PrefixFailureMonitor``): ``token_statistics(batch, rows)`` gives
  ``({"teacher_token_logprob": [n, L], ...}, mask)``, the grids of ``trd_lightning.diagnostics.STAT_COLUMNS``; with it a
  sequence's first divergence is its first token whose teacher log-prob is below the monitor's threshold.
- ``ProbeParameters``: ``probe_parameters()`` gives the parameters whose gradients are compared.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn


@runtime_checkable
class SequenceLosses(Protocol):
    def sequence_token_losses(self, batch: Any, rows: slice) -> tuple[Tensor, Tensor]: ...


@runtime_checkable
class DiagnosticViews(Protocol):
    def diagnostic_views(self, batch: Any) -> dict[str, Any]: ...


@runtime_checkable
class TokenStatistics(Protocol):
    def token_statistics(self, batch: Any, rows: slice) -> tuple[dict[str, Tensor], Tensor]: ...


@runtime_checkable
class ProbeParameters(Protocol):
    def probe_parameters(self) -> list[nn.Parameter]: ...
