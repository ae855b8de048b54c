"""DistillationModule: a student, its teacher, and one optimizer step per on-policy batch."""

from __future__ import annotations

import time
from typing import Any, Literal

import lightning as L
import torch
from torchmetrics import MeanMetric

from trd_lightning import losses
from trd_lightning.checks import check_against_data, check_vocabularies
from trd_lightning.data.demo.world import resolve
from trd_lightning.diagnostics import STAT_COLUMNS, token_distribution_stats
from trd_lightning.hf import last_hidden, load_causal_lm, load_config, output_head
from trd_lightning.lora import LoraOptions, apply_lora
from trd_lightning.metrics import AvgAtK, PassAtK
from trd_lightning.optim import warmup_cosine
from trd_lightning.rollout.assemble import response_rows
from trd_lightning.teacher import (
    SharedWeights,
    TeacherKind,
    ema_update,
    freeze,
    frozen_copy,
    needs_copy,
    refining_model,
    scoring_model,
)
from trd_lightning.verify import is_correct

LossName = Literal["jsd", "topk", "sampled_token", "pointwise_clip"]


class DistillationModule(L.LightningModule):
    """On-policy distillation of a causal LM (OPD, OPSD) with manual optimization.

    One training batch is one rollout round is one optimizer step: the DataModule's ``produce`` fills the
    batch with the student's rollouts (see ``OnPolicyDataModule``), then the step runs in micro-batches and
    divides the summed token losses by the response-token count of the whole step on all ranks, so the
    gradient does not depend on ``micro_batch_size``.

    Args:
        student: name or path of the student (a Hugging Face causal LM).
        teacher: name or path of the teacher, for ``teacher_kind: frozen``.
        teacher_kind: ``frozen`` (a separate model, never trained) or ``shared`` (the student itself, scored
            under the teacher's context: OPSD).
        shared_weights: the shared teacher's weights: ``initial`` (the starting weights: LoRA adapter off, or a
            frozen copy), ``live`` (the current student) or ``ema`` (an exponential moving average).
        ema_decay: decay of the ``ema`` teacher per optimizer step.
        lora: train a LoRA adapter instead of all weights (peft).
        dtype: weight dtype of both models: float32, bfloat16 or float16.
        loss: ``jsd`` (full-vocabulary generalized JSD), ``topk`` (on the top-k support, with a tail bucket),
            ``sampled_token`` (per-token reverse KL of the sampled token as a stop-gradient advantage) or
            ``pointwise_clip`` (the JSD with each vocabulary entry's term clipped at ``pointwise_clip``, as OPSD).
        beta: 0 is forward KL(teacher || student), 1 is reverse KL(student || teacher), in between the
            generalized JSD (for ``jsd`` and ``topk``).
        loss_temperature: both models' logits are divided by it in the loss (not the rollout temperature).
        loss_top_k: support size of the ``topk`` loss.
        loss_top_k_tail: add a tail bucket (the mass outside the support) instead of renormalising.
        loss_top_k_support: whose top-k forms the support: ``teacher`` or ``student``.
        pointwise_clip: the per-entry ceiling of ``loss: pointwise_clip`` (OPSD uses 0.05).
        token_clip: clamp each token's loss at this value (loss truncation; the TRD paper's baseline uses 0.1);
            None turns it off.
        topd: TOPD-style weighting (our reading of arXiv 2606.00305's abstract): only tokens whose loss exceeds
            ``topd_threshold`` and stays above it on average over the next ``topd_window`` tokens count, and
            their weight is spread over that window with ``topd_discount``.
        topd_threshold: the per-token loss above which a token may count as divergent.
        topd_window: the near-future window, in tokens.
        topd_discount: the discount of the spread weight per token.
        micro_batch_size: sequences per forward/backward; a memory knob only, it must divide the step's rollouts.
        loss_chunk_mib: the loss runs in chunks of response positions, each float32 [positions, vocabulary]
            tensor of a chunk at most this many MiB (220 positions at 151,936 entries): bounds the logits held
            at once whatever the vocabulary.
        loss_chunk_size: positions per loss chunk, overriding ``loss_chunk_mib``; None sizes chunks by it.
        loss_implementation: ``checkpointed`` (any loss, any head: each chunk's loss graph is recomputed in
            backward), ``closed_form`` (``loss: jsd`` at any ``beta``, bias-free output heads, unsharded: the
            value and its known gradient from one softmax pass; faster, fewer vocabulary-sized tensors) or
            ``auto``: ``closed_form`` wherever it applies, else the other losses' gradient by autograd chunk by
            chunk (same loss, same gradient).
        loss_fused: on bias-free linear heads, take each chunk's gradient in the forward pass, so backward only
            scales it (it holds one weight-sized gradient between the passes); off, backward recomputes every
            chunk's logits.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_ratio: share of the steps spent in linear warmup.
        min_lr_ratio: the cosine decay ends at ``lr * min_lr_ratio``.
        max_grad_norm: gradient clipping by global norm; None turns it off.
        gradient_checkpointing: recompute the student's activations in backward to save memory.
        trust_remote_code: allow models with custom code from the hub.
    """

    def __init__(
        self,
        student: str = "trd-demo/student",
        teacher: str | None = "trd-demo/teacher",
        teacher_kind: TeacherKind = "frozen",
        shared_weights: SharedWeights = "initial",
        ema_decay: float = 0.99,
        lora: LoraOptions | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        loss: LossName = "jsd",
        beta: float = 0.0,
        loss_temperature: float = 1.0,
        loss_top_k: int = 32,
        loss_top_k_tail: bool = True,
        loss_top_k_support: Literal["teacher", "student"] = "teacher",
        pointwise_clip: float = 0.05,
        token_clip: float | None = None,
        topd: bool = False,
        topd_threshold: float = 1.0,
        topd_window: int = 4,
        topd_discount: float = 0.9,
        micro_batch_size: int = 8,
        loss_chunk_mib: float = 128.0,
        loss_chunk_size: int | None = None,
        loss_implementation: Literal["auto", "checkpointed", "closed_form"] = "auto",
        loss_fused: bool = True,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_ratio: float = 0.1,
        min_lr_ratio: float = 0.1,
        max_grad_norm: float | None = 1.0,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"model.beta must be in [0, 1] (0 forward KL, 1 reverse KL), got {beta}.")
        if loss_temperature <= 0:
            raise ValueError(f"model.loss_temperature must be > 0, got {loss_temperature}.")
        if teacher_kind == "frozen" and not teacher:
            raise ValueError("teacher_kind: frozen needs model.teacher, the name or path of the teacher model.")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"model.ema_decay must be in [0, 1), got {ema_decay}.")
        for name in ("pointwise_clip", "token_clip"):
            if getattr(self.hparams, name) is not None and getattr(self.hparams, name) <= 0:
                raise ValueError(f"model.{name} must be > 0, got {getattr(self.hparams, name)}.")
        for name in ("micro_batch_size", "loss_chunk_size", "loss_top_k", "topd_window"):
            if getattr(self.hparams, name) is not None and getattr(self.hparams, name) < 1:
                raise ValueError(f"model.{name} must be at least 1, got {getattr(self.hparams, name)}.")
        if not loss_chunk_mib > 0:
            raise ValueError(f"model.loss_chunk_mib must be > 0, got {loss_chunk_mib}.")
        if loss_implementation == "closed_form" and loss != "jsd":
            raise ValueError(
                "model.loss_implementation: closed_form computes the jsd family only: set model.loss: jsd, or use "
                "loss_implementation: auto."
            )
        self.automatic_optimization = False
        self.student: torch.nn.Module | None = None
        self.teacher: torch.nn.Module | None = None
        self.val_accuracy = MeanMetric()
        self.val_avg_at_k = AvgAtK()
        self.val_pass_at_k = PassAtK(1)  # k is the DataModule's val_samples, known in setup
        self.val_length = MeanMetric()
        self._produce_seconds = 0.0

    # ----------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        """Check the inputs against each other before any weights are loaded."""
        hp = self.hparams
        student_cfg = load_config(resolve(hp.student), hp.trust_remote_code)
        if hp.teacher_kind == "frozen":
            teacher_cfg = load_config(resolve(hp.teacher), hp.trust_remote_code)
            check_vocabularies(hp.student, student_cfg.vocab_size, hp.teacher, teacher_cfg.vocab_size)
        data = getattr(self.trainer, "datamodule", None)
        if data is not None and hasattr(data, "produce"):
            positions = getattr(student_cfg, "max_position_embeddings", None)
            check_against_data(hp, data.hparams, data.longest_prompt, positions)
            self.val_pass_at_k = PassAtK(data.hparams.val_samples)

    def configure_model(self) -> None:
        """Load the student (and the teacher) once; called again by Lightning, it does nothing."""
        if self.student is not None:
            return
        hp = self.hparams
        student = load_causal_lm(resolve(hp.student), hp.dtype, hp.trust_remote_code)
        if hp.gradient_checkpointing:
            # transformers 5 renamed it (the old name warns); 4.x has only the old one.
            getattr(student, "activation_checkpointing_enable", student.gradient_checkpointing_enable)()
        if hp.lora is not None:
            student = apply_lora(student, hp.lora)
        self.student = student.train()  # from_pretrained returns eval mode
        if hp.teacher_kind == "frozen":
            self.teacher = freeze(load_causal_lm(resolve(hp.teacher), hp.dtype, hp.trust_remote_code))
        elif needs_copy(hp.teacher_kind, hp.shared_weights, student):
            self.teacher = frozen_copy(student)
        teacher = self.teacher if self.teacher is not None else self.student
        losses.plan(self._loss_spec, output_head(self.student), output_head(teacher))  # fail now, not at step 1

    @property
    def needs_behavior_logprobs(self) -> bool:
        return self.hparams.loss == "sampled_token"

    def scorer(self):
        """Context manager giving the model that scores as teacher."""
        return scoring_model(self.student, self.teacher, self.hparams.teacher_kind, self.hparams.shared_weights)

    def refiner(self):
        """Context manager giving the model that rewrites rollouts (TRD)."""
        return refining_model(self.student, self.teacher, self.hparams.teacher_kind, self.hparams.shared_weights)

    # -------------------------------------------------------------- training
    def on_train_batch_start(self, batch: dict, batch_idx: int) -> None:
        stats = self.trainer.datamodule.produce(batch, self)
        self._produce_seconds = stats["perf/rollout_seconds"] + stats.get("perf/refine_seconds", 0.0)
        if self._logger_writes():
            self.log_dict(stats, batch_size=len(batch["response_ids"]))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        start = time.perf_counter()
        opt = self.optimizers()
        scheduler = self.lr_schedulers()
        total = batch["num_response_tokens"].clamp(min=1)
        # Gradients are averaged over ranks by the strategy; multiplying by the world size turns that mean
        # back into the sum, so the step's loss is exactly sum(token losses) / global token count.
        scale = self.trainer.world_size / total
        rows = batch["student_ids"].shape[0]
        micro = self.hparams.micro_batch_size
        token_losses = []
        opt.zero_grad(set_to_none=True)
        for first in range(0, rows, micro):
            part = slice(first, first + micro)
            with opt.toggle_model(sync_grad=first + micro >= rows):
                per_token = self.token_losses(batch, part)
                self.manual_backward(per_token.sum() * scale)
            token_losses.append(per_token.detach())
        grad_norm = None if self.hparams.max_grad_norm is None else self._clip_gradients(opt)
        opt.step()
        scheduler.step()
        if self.hparams.teacher_kind == "shared" and self.hparams.shared_weights == "ema":
            ema_update(self.teacher, self.student, self.hparams.ema_decay)
        token_losses = torch.cat(token_losses)
        loss = self.trainer.strategy.reduce(token_losses.sum(), reduce_op="sum") / total
        self._log_step(loss, token_losses, total, grad_norm, time.perf_counter() - start)
        return loss

    def _clip_gradients(self, opt) -> torch.Tensor:
        """Clip the optimizer's gradients to ``max_grad_norm``; returns their total norm before clipping.

        ``LightningModule.clip_gradients`` clips the same parameters (the precision plugin's) but drops the norm.
        """
        from torch.distributed.tensor import DTensor

        params = list(self.trainer.precision_plugin.main_params(opt))
        norm = torch.nn.utils.clip_grad_norm_(params, self.hparams.max_grad_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def token_losses(self, batch: dict, part: slice) -> torch.Tensor:
        """Per-response-token losses of the rows ``part`` of a produced batch (student graph attached)."""
        hp = self.hparams
        response_mask = batch["response_mask"][part]
        student_rows, teacher_rows, teacher_head = self._response_hidden(batch, part)
        behavior = batch.get("behavior_logprobs")
        per_token = losses.token_losses(
            student_rows,
            teacher_rows,
            output_head(self.student),
            teacher_head,
            self._loss_spec,
            token_ids=batch["response_ids"][part][response_mask],
            behavior_logprobs=None if behavior is None else behavior[part][response_mask],
        )
        if hp.token_clip is not None:
            per_token = losses.kl_token_clip(per_token, hp.token_clip)
        if hp.topd:
            # TOPD looks along each sequence: lay the rows back out as [batch, position] and return to rows.
            weighted = losses.topd_token_loss(
                _grid(per_token, response_mask), response_mask, hp.topd_threshold, hp.topd_window, hp.topd_discount
            )
            per_token = weighted[response_mask.bool()]
        return per_token

    @property
    def _loss_spec(self) -> losses.LossSpec:
        hp = self.hparams
        return losses.LossSpec(
            kind=hp.loss,
            beta=hp.beta,
            temperature=hp.loss_temperature,
            top_k=hp.loss_top_k,
            top_k_tail=hp.loss_top_k_tail,
            top_k_support=hp.loss_top_k_support,
            pointwise_clip=hp.pointwise_clip,
            implementation=hp.loss_implementation,
            fused=hp.loss_fused,
            chunk_size=hp.loss_chunk_size,
            chunk_mib=hp.loss_chunk_mib,
        )

    def _response_hidden(self, batch: dict, part: slice):
        """Student and teacher hidden states at the response positions of rows ``part``, and the teacher's head."""
        response_mask = batch["response_mask"][part]
        hidden = last_hidden(self.student, batch["student_ids"][part], batch["student_mask"][part])
        student_rows = response_rows(hidden, batch["student_ids"].shape[1] - response_mask.shape[1], response_mask)
        with torch.no_grad(), self.scorer() as scorer:
            t_hidden = last_hidden(scorer, batch["teacher_ids"][part], batch["teacher_mask"][part])
            teacher_rows = response_rows(
                t_hidden, batch["teacher_ids"].shape[1] - response_mask.shape[1], response_mask
            )
            teacher_head = output_head(scorer)
        return student_rows, teacher_rows, teacher_head

    # ----------------------------------------------------------- diagnostics
    # The protocol of GradientFragmentationMonitor and PrefixFailureMonitor (trd_lightning.callbacks).
    def diagnostic_views(self, batch: dict) -> dict[str, dict]:
        """The rollouts to diagnose: ``y_o`` (as sampled) and, when the step refined some, ``y_r``.

        Rows are paired: row i of ``y_o`` is the rollout that row i of ``y_r`` rewrote (refined rows come first).
        """
        if "original" not in batch:
            return {"y_o": batch}
        refined = batch["refined"]
        order = torch.argsort((~refined).int(), stable=True)
        original = {k: v[order] for k, v in batch["original"].items() if v is not None}
        if not refined.any():
            return {"y_o": original}
        return {"y_o": original, "y_r": {k: batch[k][refined] for k in original}}

    def sequence_token_losses(self, batch: dict, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, L] per-token distillation losses of ``rows`` (graph attached, 0 off the mask) and the [n, L] mask."""
        mask = batch["response_mask"][rows].bool()
        if mask.shape[0] == 0:  # past the last row: the monitor's signal to stop
            return torch.zeros(mask.shape, device=mask.device), mask
        return _grid(self.token_losses(batch, rows), mask), mask

    @torch.no_grad()
    def token_statistics(self, batch: dict, rows: slice) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """[n, L] grids of ``diagnostics.STAT_COLUMNS`` for ``rows`` (teacher vs student) and the [n, L] mask."""
        mask = batch["response_mask"][rows].bool()
        if mask.shape[0] == 0:
            return {name: torch.zeros(mask.shape, device=mask.device) for name in STAT_COLUMNS}, mask
        student_rows, teacher_rows, teacher_head = self._response_hidden(batch, rows)
        values = losses.chunked_token_loss(
            student_rows,
            teacher_rows,
            output_head(self.student),
            teacher_head,
            token_distribution_stats,
            losses.chunk_rows(self._loss_spec, self.student.config.vocab_size),
            batch["response_ids"][rows][mask],
        )
        return {name: _grid(values[:, i], mask) for i, name in enumerate(STAT_COLUMNS)}, mask

    def _logger_writes(self) -> bool:
        """True on the steps the logger writes (``trainer.log_every_n_steps``).

        Each ``self.log`` costs about a millisecond of Lightning's bookkeeping, a few percent of a small model's
        step, so the step's statistics are only logged when they will be written; ``train/loss`` is logged every
        step (progress bar, ``trainer.callback_metrics``). Lightning's own monitors gate on the same private property.
        """
        return self.trainer._logger_connector.should_update_logs

    def _log_step(self, loss, token_losses: torch.Tensor, total: torch.Tensor, grad_norm, seconds: float) -> None:
        n = max(token_losses.numel(), 1)
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        if not self._logger_writes():
            return
        step_seconds = seconds + self._produce_seconds
        metrics = {
            "train/token_loss_max": token_losses.max() if token_losses.numel() else 0.0,
            "train/token_loss_std": token_losses.std() if n > 1 else 0.0,
            "train/response_tokens": total,
            "train/lr": self.lr_schedulers().get_last_lr()[0],
            "perf/train_seconds": seconds,
            "perf/rollout_fraction": self._produce_seconds / max(step_seconds, 1e-9),
            "perf/response_tokens_per_sec": total / max(step_seconds, 1e-9),
        }
        if grad_norm is not None:
            metrics["train/grad_norm"] = grad_norm
        self.log_dict(metrics, batch_size=n)

    # ------------------------------------------------------------ validation
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        data = self.trainer.datamodule
        k = data.hparams.val_samples
        seed = data.hparams.seed * 7919 + batch_idx * self.trainer.world_size + self.trainer.global_rank
        ids, mask = batch["prompt_ids"].repeat_interleave(k, 0), batch["prompt_mask"].repeat_interleave(k, 0)
        out = data.sample(self.student, ids, mask, data.val_sampling, seed)
        texts = data.tokenizer.batch_decode(out.ids, skip_special_tokens=True)
        answers = [a for a in batch["answer"] for _ in range(k)]
        self.val_length.update(out.mask.sum(-1).float())
        self.log("val/response_length", self.val_length, on_epoch=True, batch_size=len(texts))
        if all(a is not None for a in answers):
            correct = torch.tensor([is_correct(t, a) for t, a in zip(texts, answers)], device=ids.device)
            self.val_accuracy.update(correct.float())
            self.val_avg_at_k.update(correct.view(-1, k))
            self.val_pass_at_k.update(correct.view(-1, k))
            self.log("val/accuracy", self.val_accuracy, on_epoch=True, batch_size=len(texts))
            self.log(f"val/avg@{k}", self.val_avg_at_k, on_epoch=True, batch_size=len(texts))
            self.log(f"val/pass@{k}", self.val_pass_at_k, on_epoch=True, batch_size=len(texts))

    # ------------------------------------------------------------ optimizers
    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.student.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas))
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(int(total), hp.warmup_ratio, hp.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": scheduler}

    # ----------------------------------------------------------- checkpoints
    def _teacher_is_state(self) -> bool:
        # An EMA teacher is training state and must survive a resume; any other teacher is reloaded.
        return self.hparams.teacher_kind == "shared" and self.hparams.shared_weights == "ema"

    def checkpoint_excludes(self) -> list[str]:
        """The children that checkpoints leave out: the teacher, unless it is training state (EMA).

        ``FSDP2Strategy`` saves and loads only the other children; other strategies save the whole state dict
        and ``on_save_checkpoint`` drops these keys.
        """
        return ["teacher"] if self.teacher is not None and not self._teacher_is_state() else []

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        excluded = tuple(f"{name}." for name in self.checkpoint_excludes())
        if excluded:
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(excluded)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # FSDP2Strategy has loaded the weights already and passes the rest of the checkpoint, without a state_dict.
        if "state_dict" in checkpoint and "teacher" in self.checkpoint_excludes():
            # Put the loaded teacher's own weights back so that loading stays strict for the student.
            checkpoint["state_dict"].update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})


def _grid(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token values laid out as the [B, L] response grid (0 off the mask)."""
    return per_token.new_zeros(mask.shape).masked_scatter(mask.bool(), per_token)
