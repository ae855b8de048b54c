"""GradientFragmentationMonitor: do the per-sequence gradients of the distillation loss agree?

Works with any LightningModule that implements ``SequenceLosses`` (and optionally ``DiagnosticViews``,
``TokenStatistics`` and ``ProbeParameters``): see ``trd_lightning.callbacks.protocol``. Without ``TokenStatistics``, a
sequence's first divergence is its first token whose loss exceeds ``divergence_loss``. Without ``ProbeParameters``,
``probe`` chooses: LoRA weights when the module has trainable ones, else the last decoder block and the output head of
the (first trainable) Hugging Face model inside the module, else every trainable parameter.
"""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn

from trd_lightning.callbacks.periodic import PeriodicBatchCallback, suffix
from trd_lightning.callbacks.protocol import ProbeParameters, SequenceLosses, TokenStatistics
from trd_lightning.diagnostics import cosine, first_divergence, gradient_agreement

Probe = Literal["auto", "lora", "last_block", "all"]


class GradientFragmentationMonitor(PeriodicBatchCallback):
    """Every ``every_n_steps`` optimizer steps, on ``num_sequences`` sequences, logs (per view):

    - ``frag/grad_cosine``: the mean pairwise cosine between the per-sequence gradients;
    - ``frag/coherence``: |sum g_i|^2 / (K sum |g_i|^2), 1 when they all agree and 0 when they cancel;
    - ``frag/prefix_conflict``: the mean, over sequences that diverge after their first token, of the cosine
      between the gradient of the tokens before the first divergence and that of the tokens from it on.

    Cost: one forward and at most two backward passes per sequence and view, on the measured steps only.
    Memory: ``num_sequences`` flattened gradients of the probe parameters, in float32.

    Args:
        every_n_steps: measure on the steps where ``global_step % every_n_steps == 0``.
        num_sequences: K, the sequences measured per view (the first K of the batch; at least 2).
        divergence_logprob: the teacher log-prob under which a token starts the divergence (with
            ``token_statistics``).
        divergence_loss: the token loss over which a token starts the divergence (without it).
        probe: ``auto``, ``lora``, ``last_block`` (last decoder block and output head) or ``all``.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        num_sequences: int = 8,
        divergence_logprob: float = math.log(0.05),
        divergence_loss: float = 1.0,
        probe: Probe = "auto",
    ) -> None:
        super().__init__(every_n_steps)
        if num_sequences < 2:
            raise ValueError(f"num_sequences must be >= 2 to compare gradients, got {num_sequences}")
        self.num_sequences = num_sequences
        self.divergence_logprob = divergence_logprob
        self.divergence_loss = divergence_loss
        self.probe = probe

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # FSDP gathers sharded parameters outside autograd, so autograd.grad sees them as unused: per-sequence
        # gradients would come back missing or partial. Refuse before the models load rather than log nonsense.
        if isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy)):
            raise ValueError(
                "GradientFragmentationMonitor needs whole (unsharded) parameters to take per-sequence gradients and "
                f"does not run under {type(trainer.strategy).__name__}: measure on one device or without sharding."
            )

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule, batch) -> None:
        if not isinstance(pl_module, SequenceLosses):
            raise TypeError(
                f"{type(pl_module).__name__} has no sequence_token_losses(batch, rows): GradientFragmentationMonitor "
                "needs it (see trd_lightning.callbacks.protocol)."
            )
        params = probe_parameters(pl_module, self.probe)
        for name, view in self.views(pl_module, batch).items():
            grads, conflicts = self._gradients(pl_module, view, params)
            if len(grads) < 2:
                continue
            pairwise, coherence = gradient_agreement(torch.stack(grads))
            metrics = {
                f"frag/grad_cosine{suffix(name)}": pairwise,
                f"frag/coherence{suffix(name)}": coherence,
                f"frag/prefix_conflict{suffix(name)}": sum(conflicts) / len(conflicts) if conflicts else math.nan,
            }
            self.log_finite(trainer, metrics)

    def _gradients(self, pl_module, view, params: list[nn.Parameter]) -> tuple[list[torch.Tensor], list[float]]:
        """Per-sequence flattened gradients, and the before/after-divergence cosine of each diverging sequence."""
        first = None
        if isinstance(pl_module, TokenStatistics):
            stats, mask = pl_module.token_statistics(view, slice(0, self.num_sequences))
            first = first_divergence(stats["teacher_token_logprob"], mask, self.divergence_logprob)
        grads, conflicts = [], []
        for i in range(self.num_sequences):
            losses, mask = pl_module.sequence_token_losses(view, slice(i, i + 1))
            if losses.shape[0] == 0:
                break
            losses, mask = losses[0], mask[0].bool()
            if first is not None:
                d = int(first[i])
            else:
                over = (losses.detach() > self.divergence_loss) & mask
                d = int(over.float().argmax()) if over.any() else -1
            positions = torch.arange(mask.shape[0], device=mask.device)
            if d > 0:
                before = _flat_grad(losses[mask & (positions < d)].sum(), params, retain_graph=True)
                after = _flat_grad(losses[mask & (positions >= d)].sum(), params)
                conflicts.append(cosine(before, after))
                grads.append(before + after)
            else:
                grads.append(_flat_grad(losses[mask].sum(), params))
        return grads, conflicts


def _flat_grad(loss: torch.Tensor, params: list[nn.Parameter], retain_graph: bool = False) -> torch.Tensor:
    """The gradient of ``loss`` with respect to ``params``, flattened in float32; .grad is left untouched."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).float().flatten() for p, g in zip(params, grads)])


def probe_parameters(module: nn.Module, probe: Probe = "auto") -> list[nn.Parameter]:
    """The parameters whose per-sequence gradients the monitor compares (see the module docstring)."""
    if isinstance(module, ProbeParameters):
        return list(module.probe_parameters())
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("The module has no trainable parameters to probe.")
    if probe in ("auto", "lora"):
        lora = [p for n, p in trainable if "lora_" in n]
        if lora:
            return lora
        if probe == "lora":
            raise ValueError("probe='lora' but the module has no trainable LoRA weights: use probe='auto'.")
    if probe in ("auto", "last_block"):
        selected = _last_block_and_head(module)
        if selected:
            return selected
        if probe == "last_block":
            raise ValueError(
                "probe='last_block' found no Hugging Face model with _no_split_modules and a trainable last block: "
                "use probe='all' or define probe_parameters()."
            )
    return [p for _, p in trainable]


def _last_block_and_head(module: nn.Module) -> list[nn.Parameter]:
    for model in module.modules():
        blocks_named = getattr(model, "_no_split_modules", None)
        if not blocks_named or not hasattr(model, "get_output_embeddings"):
            continue
        blocks = [m for m in model.modules() if type(m).__name__ in set(blocks_named)]
        head = model.get_output_embeddings()
        chosen = list(blocks[-1].parameters()) if blocks else []
        chosen += list(head.parameters()) if head is not None else []
        unique = list({id(p): p for p in chosen if p.requires_grad}.values())
        if unique:
            return unique
    return []
