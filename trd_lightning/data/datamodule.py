"""OnPolicyDataModule: prompts in, on-policy distillation batches out."""

from __future__ import annotations

import time
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from trd_lightning import prompts
from trd_lightning.data.rows import RowFormat, check_answer_pattern, longest_prompt, prepare_rows
from trd_lightning.data.sampler import ResumableSampler
from trd_lightning.data.sources import check_columns, load_rows
from trd_lightning.hf import load_tokenizer
from trd_lightning.rollout.assemble import concat_left_padded, pad_left, unpad_left
from trd_lightning.rollout.generation import Rollouts, SamplingConfig, sample
from trd_lightning.rollout.refiner import Refiner
from trd_lightning.verify import is_correct


class OnPolicyDataModule(L.LightningDataModule):
    """Prompt datasets for on-policy distillation, and the per-step rollout that turns prompts into a batch.

    Each training batch holds the prompts of one optimizer step. ``produce`` (called from the module's
    ``on_train_batch_start``) samples the student's responses and writes the student and teacher sequences
    into the batch: identical response ids on both sides, the teacher's context being the prompt (OPD) or
    the prompt with the reference solution (OPSD).

    Args:
        tokenizer: name or path of the student's tokenizer (linked to ``model.student`` by the CLI).
        train_data: ``trd-demo``, a local json/jsonl/parquet/csv file or saved dataset folder, or a hub name.
        train_split: the split to train on.
        val_data: the dataset to validate on; defaults to ``train_data``.
        val_split: the split to validate on; None turns validation off.
        subset: the hub dataset's configuration name, when it has several.
        val_subset: the validation dataset's configuration name (e.g. ``main`` for GSM8K).
        val_problem_column: the validation dataset's problem column; defaults to ``problem_column``.
        val_answer_column: the validation dataset's answer column; defaults to ``answer_column``.
        answer_pattern: a regular expression whose first group is the final answer inside an answer column that
            holds more, e.g. ``(?:####)\\s*(.+)`` for GSM8K (start it with a group, not ``#``: a value read from
            YAML that starts with ``#`` is a comment); its last match is used. None keeps answers as they are.
        problem_column: the column holding the problem text.
        solution_column: the column holding the reference solution (needed for ``teacher_context: privileged``).
        answer_column: the column holding the final answer, for accuracy; None when there is none.
        teacher_context: ``prompt`` (OPD: the teacher sees what the student sees) or ``privileged`` (OPSD: the
            teacher also sees the reference solution).
        student_template: the student's prompt, with a ``{problem}`` slot.
        privileged_template: the privileged teacher prompt, with ``{problem}`` and ``{solution}`` slots.
        use_chat_template: wrap prompts as a user turn when the tokenizer has a chat template.
        chat_template_kwargs: extra arguments to ``apply_chat_template`` of every prompt (e.g.
            ``{enable_thinking: false}``).
        teacher_chat_template_kwargs: arguments that override ``chat_template_kwargs`` for the teacher's prompt
            (e.g. ``{enable_thinking: true}`` for a thinking teacher beside a non-thinking student).
        batch_size: prompts per optimizer step on each device.
        num_generations: rollouts sampled per prompt.
        max_prompt_length: the longest student prompt in tokens; longer problems are dropped (never cut).
        max_teacher_prompt_length: the longest teacher prompt; the reference solution's tail is cut to fit.
        max_new_tokens: the longest rollout.
        temperature: rollout sampling temperature.
        top_p: rollout nucleus sampling mass.
        top_k: rollout top-k sampling (0 turns it off).
        val_batch_size: prompts per validation batch.
        val_samples: responses sampled per validation prompt.
        val_temperature: validation sampling temperature (0 is greedy).
        max_val_prompts: use at most this many validation prompts.
        refine: Trajectory-Refined Distillation: the refiner (the teacher for OPD, the initial student shown
            the reference for OPSD) rewrites the student's rollouts and the student learns the rewrites. How
            many and which are refined is set by the ``RefinementScheduler`` callback (default: all).
        refine_template: the refine prompt, with ``{problem}``, ``{initial}`` and (OPSD) ``{solution}`` slots;
            None picks the default for the teacher context and ``refine_task``.
        refine_task: ``math`` or ``code``: which default refine prompt to use.
        refine_teacher_context: score ``y_r`` after the refine prompt (``refine``, the authors' choice) or after
            the original teacher context (``original``).
        max_refine_prompt_length: the refine prompt's budget; the attempt's tail is cut first, then the reference's.
        refine_max_new_tokens: the longest rewrite (defaults to ``max_new_tokens``).
        refine_temperature: the refiner's sampling temperature (0 is greedy).
        refine_top_p: the refiner's nucleus sampling mass.
        refine_top_k: the refiner's top-k sampling (0 turns it off).
        generation_cache: the key/value cache of every generation (rollouts, validation, refinement): ``dynamic``
            (grows with the sequence) or ``static`` (``decoder: generate`` only; allocated once at full length, fixed
            shapes; needed by ``compile_generation``).
        compile_generation: ``torch.compile`` the decoding steps of every generation (needs ``generation_cache:
            static``); each model compiles on its first generation, which is slow, and again when its batch size
            changes or a longer sequence than any before grows its cache.
        token_sampler: how ``generate`` draws sampled tokens: ``inverse_cdf`` (one uniform number per row in the
            cumulative distribution; the same distribution, much less random-number work per token at large
            vocabularies) or ``multinomial`` (``generate``'s own); see ``SamplingConfig``.
        decoder: ``native`` (a plain decoding loop with a dynamic cache, inverse-CDF draws under the same sampling
            rules, less per-token overhead) or ``generate`` (Hugging Face's: needed for ``generation_cache: static``
            and ``compile_generation``); see ``SamplingConfig``.
        offline_data: train on a refinement round written by ``trd refine`` (a folder of shards) instead of
            generating: the student learns each row's ``y_r``, scored after the refine prompt of its ``y_o``.
        seed: seed of the data order and of the rollouts (each step's rollout is seeded from it and the step).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        tokenizer: str = "trd-demo/student",
        train_data: str = "trd-demo",
        train_split: str = "train",
        val_data: str | None = None,
        val_split: str | None = "validation",
        subset: str | None = None,
        val_subset: str | None = None,
        val_problem_column: str | None = None,
        val_answer_column: str | None = None,
        answer_pattern: str | None = None,
        problem_column: str = "problem",
        solution_column: str | None = "solution",
        answer_column: str | None = "answer",
        teacher_context: Literal["prompt", "privileged"] = "prompt",
        student_template: str = prompts.STUDENT_TEMPLATE,
        privileged_template: str = prompts.PRIVILEGED_TEMPLATE,
        use_chat_template: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        teacher_chat_template_kwargs: dict[str, Any] | None = None,
        batch_size: int = 8,
        num_generations: int = 1,
        max_prompt_length: int = 512,
        max_teacher_prompt_length: int = 1024,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        val_batch_size: int = 32,
        val_samples: int = 1,
        val_temperature: float = 0.0,
        max_val_prompts: int | None = None,
        refine: bool = False,
        refine_template: str | None = None,
        refine_task: Literal["math", "code"] = "math",
        refine_teacher_context: Literal["refine", "original"] = "refine",
        max_refine_prompt_length: int = 2048,
        refine_max_new_tokens: int | None = None,
        refine_temperature: float = 0.6,
        refine_top_p: float = 0.95,
        refine_top_k: int = 20,
        generation_cache: Literal["dynamic", "static"] = "dynamic",
        compile_generation: bool = False,
        token_sampler: Literal["multinomial", "inverse_cdf"] = "inverse_cdf",
        decoder: Literal["generate", "native"] = "native",
        offline_data: str | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for name in (
            "batch_size",
            "num_generations",
            "max_prompt_length",
            "max_teacher_prompt_length",
            "val_batch_size",
            "val_samples",
        ):
            if getattr(self.hparams, name) < 1:
                raise ValueError(f"data.{name} must be at least 1, got {getattr(self.hparams, name)}.")
        if teacher_context == "privileged" and solution_column is None:
            raise ValueError(
                "teacher_context: privileged (OPSD) shows the teacher the reference solution, but solution_column "
                "is None: set data.solution_column to the dataset's reference-solution column."
            )
        prompts.check_template(student_template, {"problem"}, "student")
        check_answer_pattern(answer_pattern)
        if offline_data and not (refine and num_generations == 1):
            raise ValueError(
                "data.offline_data trains on a written refinement round: set data.refine: true (for the refine "
                "prompt) and data.num_generations: 1."
            )
        if teacher_context == "privileged":
            prompts.check_template(privileged_template, {"problem", "solution"}, "privileged")
        speed = {"cache": generation_cache, "compile": compile_generation, "sampler": token_sampler, "decoder": decoder}
        self.sampling = SamplingConfig(max_new_tokens, temperature, top_p, top_k, **speed)
        self.val_sampling = SamplingConfig(max_new_tokens, val_temperature, top_p, top_k, **speed)
        self.refine_sampling = SamplingConfig(
            refine_max_new_tokens or max_new_tokens, refine_temperature, refine_top_p, refine_top_k, **speed
        )
        self.refine_template = refine_template or prompts.REFINE_TEMPLATES[(teacher_context, refine_task)]
        if refine:
            slots = {"problem", "initial"} | ({"solution"} if teacher_context == "privileged" else set())
            prompts.check_template(self.refine_template, slots, "refine")
        self.refiner: Refiner | None = None
        self.tokenizer = None
        self.train_rows: list[dict] | None = None
        self.val_rows: list[dict] | None = None
        self.longest_prompt = 0
        self._epoch, self._consumed, self._skip = 0, 0, 0

    # ------------------------------------------------------------------ data
    def setup(self, stage: str) -> None:
        hp = self.hparams
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(hp.tokenizer)
        if hp.refine and self.refiner is None:
            self.refiner = Refiner(
                self.tokenizer,
                self.refine_template,
                hp.max_refine_prompt_length,
                self.refine_sampling,
                hp.refine_teacher_context,
                hp.use_chat_template,
                hp.chat_template_kwargs,
            )
        if stage == "fit" and self.train_rows is None:
            if hp.offline_data:
                self.train_rows = self._prepare(hp.offline_data, "train", offline=True)
            else:
                self.train_rows = self._prepare(hp.train_data, hp.train_split)
        if stage in ("fit", "validate") and self.val_rows is None and self.hparams.val_split is not None:
            rows = self._prepare(self.hparams.val_data or self.hparams.train_data, self.hparams.val_split, val=True)
            limit = len(rows) if self.hparams.max_val_prompts is None else self.hparams.max_val_prompts
            self.val_rows = rows.select(range(min(limit, len(rows))))

    def _prepare(self, source: str, split: str, offline: bool = False, val: bool = False):
        """Load, check and tokenize one split (an offline round has fixed column names, ``y_o``/``y_r`` among them)."""
        hp = self.hparams
        dataset = load_rows(source, split, None if offline else (hp.val_subset if val else hp.subset))
        columns = {"problem": hp.problem_column, "solution": hp.solution_column, "answer": hp.answer_column}
        if val:
            columns.update(problem=hp.val_problem_column or hp.problem_column, solution=None)
            columns["answer"] = hp.val_answer_column or hp.answer_column
        if offline:
            answer = "answer" if hp.answer_column else None  # rows need answers only where answers are used
            columns = {"problem": "problem", "solution": "solution", "answer": answer, "y_o": "y_o", "y_r": "y_r"}
        elif hp.teacher_context != "privileged" and not val:
            columns["solution"] = None if hp.solution_column not in dataset.column_names else hp.solution_column
        check_columns(dataset, columns, source)
        # Validation prompts the student alone: no teacher prompt to build.
        privileged = hp.privileged_template if hp.teacher_context == "privileged" and not val else None
        fmt = RowFormat(
            hp.student_template,
            privileged,
            hp.max_prompt_length,
            hp.max_teacher_prompt_length,
            hp.use_chat_template,
            hp.chat_template_kwargs,
            None if val else hp.teacher_chat_template_kwargs,
            hp.answer_pattern,
        )
        rows = prepare_rows(dataset, columns, self.tokenizer, fmt, f"{source!r} split {split!r}")
        self.longest_prompt = max(self.longest_prompt, longest_prompt(rows))
        return rows

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        sampler = ResumableSampler(
            self.train_rows,
            trainer.world_size if trainer else 1,
            trainer.global_rank if trainer else 0,
            shuffle=True,
            seed=self.hparams.seed,
        )
        sampler.skip, self._skip = self._skip, 0
        return DataLoader(
            self.train_rows,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            drop_last=True,
            collate_fn=self.collate,
            num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        if not self.val_rows:
            return []
        return DataLoader(
            self.val_rows,
            batch_size=self.hparams.val_batch_size,
            shuffle=False,
            collate_fn=self.collate,
            num_workers=self.hparams.num_workers,
        )

    def collate(self, rows: list[dict]) -> dict[str, Any]:
        pad = self.tokenizer.pad_token_id
        prompt_ids, prompt_mask = pad_left([r["prompt_ids"] for r in rows], pad)
        teacher_ids, teacher_mask = pad_left([r["teacher_ids"] for r in rows], pad)
        return {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "teacher_prompt_ids": teacher_ids,
            "teacher_prompt_mask": teacher_mask,
            "index": torch.tensor([r["index"] for r in rows]),
            "problem": [r["problem"] for r in rows],
            "solution": [r["solution"] for r in rows],
            "answer": [r["answer"] for r in rows],
            "y_o": [r.get("y_o") for r in rows],
            "y_r": [r.get("y_r") for r in rows],
        }

    # -------------------------------------------------------------- rollouts
    @property
    def eos_ids(self) -> list[int]:
        return [self.tokenizer.eos_token_id]

    def sample(
        self,
        model,
        ids: torch.Tensor,
        mask: torch.Tensor,
        sampling: SamplingConfig,
        seed: int,
        with_logprobs: bool = False,
    ) -> Rollouts:
        """One response per left-padded prompt row from ``model``, seeded by ``seed``.

        The seed makes a step's rollout independent of what ran before it, so a resumed run samples the
        same responses the uninterrupted run would have.
        """
        devices = [ids.device] if ids.device.type == "cuda" else []
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                if devices:
                    torch.cuda.manual_seed(seed)
                return sample(
                    model,
                    ids,
                    mask,
                    sampling,
                    self.eos_ids,
                    self.tokenizer.pad_token_id,
                    with_logprobs,
                    synced_gpus=self.trainer is not None and self.trainer.world_size > 1,
                )
        finally:
            model.train(was_training)

    def produce(self, batch: dict, module) -> dict[str, float]:
        """Turn a prompt batch into an on-policy distillation batch, in place; return rollout statistics.

        Writes ``student_ids/student_mask`` (prompt + response), ``teacher_ids/teacher_mask`` (teacher context
        + the same response), ``response_ids/response_mask``, ``behavior_logprobs`` (when the loss needs
        them), ``num_response_tokens`` (the response-token count of the whole step on all ranks) and, per
        rollout, ``rollout_text``, ``refined_text`` (None where it was not refined) and ``refined`` (bool). With
        refinement on, ``original`` holds the same sequence keys for the rollouts as sampled (``y_o`` in its
        usual teacher context), for diagnostics.
        """
        trainer = module.trainer
        self._count_batch(trainer.current_epoch)
        repeats = self.hparams.num_generations
        seed = self.hparams.seed * 1_000_003 + trainer.global_step * trainer.world_size + trainer.global_rank
        prompt_ids = batch["prompt_ids"].repeat_interleave(repeats, 0)
        prompt_mask = batch["prompt_mask"].repeat_interleave(repeats, 0)
        start = time.perf_counter()
        if self.hparams.offline_data:
            out = self._from_text(batch["y_o"], prompt_ids.device)
        else:
            out = self.sample(
                module.student, prompt_ids, prompt_mask, self.sampling, seed, module.needs_behavior_logprobs
            )
        rollout_seconds = time.perf_counter() - start

        rows = [
            {"problem": p, "solution": s, "answer": a}
            for p, s, a in zip(batch["problem"], batch["solution"], batch["answer"])
            for _ in range(repeats)
        ]
        texts = (
            batch["y_o"]
            if self.hparams.offline_data
            else self.tokenizer.batch_decode(out.ids, skip_special_tokens=True)
        )
        correct = None
        if all(r["answer"] is not None for r in rows):
            correct = [is_correct(t, r["answer"]) for t, r in zip(texts, rows)]
        t_ids = batch["teacher_prompt_ids"].repeat_interleave(repeats, 0)
        t_mask = batch["teacher_prompt_mask"].repeat_interleave(repeats, 0)
        stats = _rollout_stats(out, correct, rollout_seconds)

        response, refined_texts = out, [None] * len(texts)
        # Refinement gives rows their own teacher contexts; plain OPD/OPSD keeps the collated tensors as they are.
        contexts = unpad_left(t_ids, t_mask) if self.refiner is not None else None
        if self.refiner is not None:
            # The rollouts as sampled, in their usual contexts, for diagnostics that compare y_o with y_r.
            batch["original"] = self._sequences(prompt_ids, prompt_mask, t_ids, t_mask, out)
        if self.hparams.offline_data:
            response, refined_texts = self._from_text(batch["y_r"], prompt_ids.device), list(batch["y_r"])
            contexts = [
                self.refiner.prompt_ids(r["problem"], r["solution"], t)
                if self.hparams.refine_teacher_context == "refine"
                else c
                for r, t, c in zip(rows, texts, contexts)
            ]
        elif self.refiner is not None:
            start = time.perf_counter()
            result = self.refiner.refine(
                module, self.sample, prompt_ids, prompt_mask, out, texts, rows, correct, contexts, seed
            )
            response, contexts, refined_texts = result.response, result.teacher_contexts, result.refined_texts
            stats.update(result.stats, **{"perf/refine_seconds": time.perf_counter() - start})

        if contexts is not None:
            t_ids, t_mask = (t.to(prompt_ids.device) for t in pad_left(contexts, self.tokenizer.pad_token_id))
        batch.update(
            self._sequences(prompt_ids, prompt_mask, t_ids, t_mask, response),
            num_response_tokens=trainer.strategy.reduce(response.mask.sum().float(), reduce_op="sum"),
            rollout_text=texts,
            refined_text=refined_texts,
            refined=torch.tensor([t is not None for t in refined_texts], device=prompt_ids.device),
        )
        return stats

    @staticmethod
    def _sequences(prompt_ids, prompt_mask, t_ids, t_mask, response: Rollouts) -> dict[str, torch.Tensor]:
        """Student (prompt + response) and teacher (context + response) sequences with identical response ids."""
        student_ids, student_mask = concat_left_padded(prompt_ids, prompt_mask, response.ids, response.mask)
        teacher_ids, teacher_mask = concat_left_padded(t_ids, t_mask, response.ids, response.mask)
        width = response.ids.shape[1]
        if not torch.equal(student_ids[:, -width:], teacher_ids[:, -width:]):
            raise RuntimeError("The student and teacher sequences must end in identical response ids.")
        return {
            "student_ids": student_ids,
            "student_mask": student_mask,
            "teacher_ids": teacher_ids,
            "teacher_mask": teacher_mask,
            "response_ids": response.ids,
            "response_mask": response.mask,
            "behavior_logprobs": response.behavior_logprobs,
        }

    def _from_text(self, texts: list[str], device) -> Rollouts:
        """Written responses as rollouts: tokenized, ended with the end token, cut at ``max_new_tokens``."""
        limit, eos = self.hparams.max_new_tokens, self.tokenizer.eos_token_id
        lists = [self.tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in texts]
        truncated = torch.tensor([len(x) > limit for x in lists], device=device)
        lists = [x[:limit] for x in lists]
        width = max(len(x) for x in lists)
        ids = torch.full((len(lists), width), self.tokenizer.pad_token_id, dtype=torch.long)
        for i, x in enumerate(lists):
            ids[i, : len(x)] = torch.tensor(x)
        mask = torch.arange(width)[None, :] < torch.tensor([len(x) for x in lists])[:, None]
        return Rollouts(ids=ids.to(device), mask=mask.to(device), truncated=truncated)

    # ------------------------------------------------------------ resumption
    def _count_batch(self, epoch: int) -> None:
        if epoch != self._epoch:
            self._epoch, self._consumed = epoch, 0
        self._consumed += 1

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "consumed_batches": self._consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._epoch, self._consumed = state["epoch"], state["consumed_batches"]
        # The next train_dataloader starts this epoch's order where the checkpoint left it.
        self._skip = self._consumed * self.hparams.batch_size


def _rollout_stats(out: Rollouts, correct: list[bool] | None, seconds: float) -> dict[str, float]:
    lengths = out.mask.sum(-1).float()
    stats = {
        "rollout/response_length": lengths.mean().item(),
        "rollout/response_length_max": lengths.max().item(),
        "rollout/truncated_frac": out.truncated.float().mean().item(),
        "perf/rollout_seconds": seconds,
        "perf/rollout_tokens_per_sec": lengths.sum().item() / max(seconds, 1e-9),
    }
    if correct is not None:
        stats["rollout/accuracy"] = sum(correct) / len(correct)
    return stats
