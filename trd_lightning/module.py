"""DistillationModule: a student, its teacher, and one optimizer step per on-policy batch."""

from __future__ import annotations

import time
import warnings
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning

from trd_lightning.checks import check_against_data, check_module_options, check_optimizer, check_vocabularies
from trd_lightning.diagnostics import STAT_COLUMNS
from trd_lightning.evaluation import EvalMetrics
from trd_lightning.groups import as_group
from trd_lightning.hf import load_causal_lm, load_config, output_head
from trd_lightning.lora import LoraOptions, apply_lora
from trd_lightning.losses import LossKind, LossSpec, plan
from trd_lightning.objective import Objective, grid, micro_batches
from trd_lightning.optim import warmup_cosine
from trd_lightning.rollout.batch import PromptBatch, RolloutModels, Sequences, StepInfo
from trd_lightning.serve.checkpoint import service_callbacks
from trd_lightning.serve.options import ServiceOptions, check_served_teacher, check_url
from trd_lightning.teacher import (
    SharedWeights,
    TeacherKind,
    ema_update,
    freeze,
    frozen_copy,
    needs_copy,
    refiner,
    scorer,
)

# The frozen teacher is in eval mode on purpose: its scores take no dropout.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=PossibleUserWarning)
# One rollout round is one optimizer step: a checkpoint after the step is exactly what a resume continues from.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization", category=UserWarning)


class DistillationModule(L.LightningModule):
    """On-policy distillation of a causal LM (OPD, OPSD; TRD through the DataModule) with manual optimization.

    One training batch is one rollout round is one optimizer step: in ``on_train_batch_start`` the DataModule's
    ``produce`` turns the step's prompts into a ``DistillBatch`` (see ``OnPolicyDataModule``); the step then runs in
    micro-batches and divides the summed token losses by the response-token count of the whole step on all ranks, so
    the gradient does not depend on how the step is split.

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
        loss_ratio_clip: ``sampled_token``'s importance ratio to the behaviour log-probs capped here (TIS), for
            stale or engine-sampled rollouts; None: uncapped (the other losses recompute the student's log-probs).
        token_clip: clamp each token's loss at this value (loss truncation; the TRD paper's baseline uses 0.1);
            None turns it off.
        topd: TOPD-style weighting (our reading of arXiv 2606.00305's abstract): only tokens whose loss exceeds
            ``topd_threshold`` and stays above it on average over the next ``topd_window`` tokens count, and
            their weight is spread over that window with ``topd_discount``.
        topd_threshold: the per-token loss above which a token may count as divergent.
        topd_window: the near-future window, in tokens.
        topd_discount: the discount of the spread weight per token.
        micro_batch_size: sequences per forward/backward; a memory knob only, it must divide the step's rollouts.
        micro_batch_tokens: form micro-batches by a token budget instead: rows of similar length together, each
            micro-batch's forward passes at most this many positions (padding included). None: by row count.
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
        teacher_url: a served teacher (``trd serve`` or vLLM; README): its top-k scores replace an in-process one,
            never loaded (``loss: topk`` or ``sampled_token``, ``loss_temperature: 1``; TRD-OPD: ``data.refine.url``).
        teacher_service: timeout, retries, backoff and concurrency of the served teacher's requests.
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
        loss: LossKind = "jsd",
        beta: float = 0.0,
        loss_temperature: float = 1.0,
        loss_top_k: int = 32,
        loss_top_k_tail: bool = True,
        loss_top_k_support: Literal["teacher", "student"] = "teacher",
        pointwise_clip: float = 0.05,
        loss_ratio_clip: float | None = None,
        token_clip: float | None = None,
        topd: bool = False,
        topd_threshold: float = 1.0,
        topd_window: int = 4,
        topd_discount: float = 0.9,
        micro_batch_size: int = 8,
        micro_batch_tokens: int | None = None,
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
        teacher_url: str | None = None,
        teacher_service: ServiceOptions = ServiceOptions(),
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        lora = None if lora is None else as_group(LoraOptions, lora, "model.lora")  # or plain dicts, from Python
        teacher_service = as_group(ServiceOptions, teacher_service, "model.teacher_service")
        check_module_options(self.hparams)
        check_url(teacher_url, "model.teacher_url")
        if teacher_url:
            check_served_teacher(teacher_kind, loss, loss_temperature, loss_top_k_support)
        elif teacher_kind == "frozen" and not teacher:
            raise ValueError("teacher_kind: frozen needs model.teacher, the name or path of the teacher model.")
        check_optimizer(lr, weight_decay, betas, warmup_ratio, min_lr_ratio)
        spec = LossSpec(
            loss, beta, loss_temperature, loss_top_k, loss_top_k_tail, loss_top_k_support, pointwise_clip,
            loss_implementation, loss_fused, loss_chunk_size, loss_chunk_mib, loss_ratio_clip,
        )  # fmt: skip
        self.objective = Objective(spec, token_clip, topd, topd_threshold, topd_window, topd_discount)
        self.lora_options, self.teacher_service = lora, teacher_service  # typed: LightningCLI's hparams hold dicts
        self.automatic_optimization = False
        self.student: torch.nn.Module | None = None  # both loaded in configure_model
        self.teacher: torch.nn.Module | None = None
        self.served_teacher = None  # connected in setup when model.teacher_url is set
        self.val_metrics = EvalMetrics("val", 1)  # k is the DataModule's validation.samples, known in setup
        self.test_metrics = EvalMetrics("test", 1)
        self._produce_seconds = 0.0

    # ----------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        """Check the inputs against each other before any weights are loaded."""
        hp = self.hparams
        student_cfg = load_config(hp.student, hp.trust_remote_code)
        data = getattr(self.trainer, "datamodule", None)
        spec = data.spec() if data is not None and hasattr(data, "spec") else None
        if hp.teacher_url and self.served_teacher is None:  # up, same tokenizer and vocabulary: before any weights
            from trd_lightning.serve.teacher import connect_teacher  # the serve extra, needed only here

            needed = None if spec is None else spec.longest_row + 1  # one token is generated alongside
            self.served_teacher = connect_teacher(hp, self.teacher_service, student_cfg.vocab_size, needed)
        elif hp.teacher_kind == "frozen" and not hp.teacher_url:
            teacher_cfg = load_config(hp.teacher, hp.trust_remote_code)
            check_vocabularies(hp.student, student_cfg.vocab_size, hp.teacher, teacher_cfg.vocab_size)
        if spec is not None:
            micro = None if hp.micro_batch_tokens else hp.micro_batch_size
            check_against_data(hp.teacher_kind, micro, spec, getattr(student_cfg, "max_position_embeddings", None))
            if hp.teacher_url and getattr(data, "refines_in_process", False):
                self._not_served("refines with it in-process: set data.refine.url to a service of the teacher")
            self.val_metrics = EvalMetrics("val", spec.validation_samples)
            self.test_metrics = EvalMetrics("test", spec.validation_samples)

    def configure_model(self) -> None:
        """Load the student (and the teacher) once; called again by Lightning, it does nothing."""
        if self.student is not None:
            return
        hp = self.hparams
        student = load_causal_lm(hp.student, hp.dtype, hp.trust_remote_code)
        if hp.gradient_checkpointing:
            # transformers 5 renamed it (the old name warns); 4.x has only the old one.
            getattr(student, "activation_checkpointing_enable", student.gradient_checkpointing_enable)()
        if self.lora_options is not None:
            student = apply_lora(student, self.lora_options)
        self.student = student.train()  # from_pretrained returns eval mode
        if hp.teacher_kind == "frozen" and not hp.teacher_url:
            self.teacher = freeze(load_causal_lm(hp.teacher, hp.dtype, hp.trust_remote_code))
        elif needs_copy(hp.teacher_kind, hp.shared_weights, student):
            self.teacher = frozen_copy(student)
        if hp.loss_implementation == "closed_form":
            with self.scorer() as model:  # fail now, not at the first step
                plan(self.objective.spec, output_head(self.student), output_head(model))

    def scorer(self):
        """Context manager giving the model that scores as teacher."""
        self._not_served("scores rollouts in-process (RefinementScheduler mode: divergent); use mode all or incorrect")
        return scorer(self.student, self.teacher, self.hparams.teacher_kind, self.hparams.shared_weights)

    def refiner(self):
        """Context manager giving the frozen model that rewrites rollouts (TRD)."""
        self._not_served("refines with it in-process: set data.refine.url to a service of the teacher")
        return refiner(self.student, self.teacher, self.hparams.teacher_kind, self.hparams.shared_weights)

    def rollout_models(self) -> RolloutModels:
        """The narrow handle the rollout side gets: what to sample from, and how to open the scorer and refiner."""
        return RolloutModels(student=self.student, scorer=self.scorer, refiner=self.refiner)

    def _not_served(self, what: str) -> None:
        if self.hparams.teacher_url:
            raise ValueError(
                f"model.teacher_url serves the teacher, which the trainer does not load, but the run {what}."
            )

    def configure_callbacks(self):
        """A run with a served teacher or refiner stops with a checkpoint when its service fails for good."""
        return service_callbacks(self.trainer, bool(self.hparams.teacher_url))

    def _step_info(self) -> StepInfo:
        return StepInfo(self.global_step, self.global_rank, self.trainer.world_size)

    # -------------------------------------------------------------- training
    def on_train_batch_start(self, batch: PromptBatch, batch_idx: int) -> None:
        batch.produced = self.trainer.datamodule.produce(batch, self.rollout_models(), self._step_info())
        self._produce_seconds = batch.produced.stats["perf/produce_seconds"]
        if self._logger_writes():
            self.log_dict(batch.produced.stats, batch_size=len(batch.produced.train))

    def training_step(self, batch: PromptBatch, batch_idx: int) -> torch.Tensor:
        start = time.perf_counter()
        opt, scheduler = self.optimizers(), self.lr_schedulers()
        seqs = batch.produced.train
        total = self.trainer.strategy.reduce(seqs.response_mask.sum().float(), reduce_op="sum").clamp(min=1)
        # Gradients are averaged over ranks by the strategy; multiplying by the world size turns that mean
        # back into the sum, so the step's loss is exactly sum(token losses) / global token count.
        scale = self.trainer.world_size / total
        parts = micro_batches(seqs, self.hparams.micro_batch_size, self.hparams.micro_batch_tokens)
        # A served teacher scores the whole step at once (concurrent requests); each micro-batch takes its slice.
        scores = None if self.served_teacher is None else self.served_teacher.scores(seqs)
        token_losses = []
        opt.zero_grad(set_to_none=True)
        for i, rows in enumerate(parts):
            with opt.toggle_model(sync_grad=i == len(parts) - 1):
                part = seqs.rows(rows)
                served = () if scores is None else (scores.rows(rows, part.response_ids.shape[1]),)
                per_token = self.token_losses(part, *served)
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

    def token_losses(self, seqs: Sequences, scores=None) -> torch.Tensor:
        """Per-response-token losses of ``seqs`` (student graph attached), in ``response_mask`` order; ``scores``:
        a served teacher's ``TeacherScores`` of ``seqs`` (fetched here when None)."""
        if self.served_teacher is not None and scores is None:
            scores = self.served_teacher.scores(seqs)
        return self.objective.token_losses(self.student, self.scorer, seqs, scores)

    def _clip_gradients(self, opt) -> torch.Tensor:
        """Clip the optimizer's gradients to ``max_grad_norm``; returns their total norm before clipping.

        ``LightningModule.clip_gradients`` clips the same parameters (the precision plugin's) but drops the norm.
        """
        from torch.distributed.tensor import DTensor

        params = list(self.trainer.precision_plugin.main_params(opt))
        norm = torch.nn.utils.clip_grad_norm_(params, self.hparams.max_grad_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    # ----------------------------------------------------------- diagnostics
    # The protocol of GradientFragmentationMonitor and PrefixFailureMonitor (trd_lightning.callbacks.protocol).
    def diagnostic_views(self, batch: PromptBatch) -> dict[str, Sequences]:
        """The rollouts to diagnose: ``y_o`` (as sampled) and, when the step refined some, ``y_r``.

        Rows are paired: row i of ``y_o`` is the rollout that row i of ``y_r`` rewrote (refined rows come first).
        """
        produced = batch.produced
        if produced.original is None:
            return {"y_o": produced.train}
        order = torch.argsort((~produced.refined).int(), stable=True)
        original = produced.original.rows(order)
        if not produced.refined.any():
            return {"y_o": original}
        return {"y_o": original, "y_r": produced.train.rows(produced.refined.nonzero()[:, 0])}

    def sequence_token_losses(self, view: Sequences, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, L] per-token distillation losses of ``rows`` (graph attached, 0 off the mask) and the [n, L] mask."""
        part = view.rows(rows)
        mask = part.response_mask.bool()
        if mask.shape[0] == 0:  # past the last row: the monitor's signal to stop
            return torch.zeros(mask.shape, device=mask.device), mask
        return grid(self.token_losses(part), mask), mask

    @torch.no_grad()
    def token_statistics(self, view: Sequences, rows: slice) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """[n, L] grids of ``diagnostics.STAT_COLUMNS`` for ``rows`` (teacher vs student) and the [n, L] mask."""
        part = view.rows(rows)
        mask = part.response_mask.bool()
        if mask.shape[0] == 0:
            return {name: torch.zeros(mask.shape, device=mask.device) for name in STAT_COLUMNS}, mask
        served = None if self.served_teacher is None else self.served_teacher.scores(part)
        values = self.objective.token_statistics(self.student, self.scorer, part, served)
        return {name: grid(values[:, i], mask) for i, name in enumerate(STAT_COLUMNS)}, mask

    # --------------------------------------------------------------- logging
    def _logger_writes(self) -> bool:
        """True on the steps the logger writes (``trainer.log_every_n_steps``): each ``self.log`` costs about a
        millisecond, a few percent of a small model's step, so statistics are logged only then (``train/loss``
        every step). Lightning's own monitors gate on the same private property."""
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

    # ------------------------------------------------------------ evaluation
    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    def test_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics)

    def _evaluate(self, batch: PromptBatch, metrics: EvalMetrics) -> None:
        out = self.trainer.datamodule.validation_rollouts(batch, self.rollout_models(), self._step_info())
        metrics.update(out)
        self.log_dict(metrics.loggable(out.correct is not None), on_epoch=True, batch_size=len(out.texts))

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
