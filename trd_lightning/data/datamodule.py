"""OnPolicyDataModule: prompt datasets in, and at every step the refined on-policy batch out."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from trd_lightning import prompts as templates
from trd_lightning.data.alignment import merged_kwargs
from trd_lightning.data.options import (
    CodeFormat,
    CodeOptions,
    PromptOptions,
    RefineOptions,
    RolloutOptions,
    Task,
    ValidationOptions,
)
from trd_lightning.data.prepare import prepare_split
from trd_lightning.data.rows import check_answer_pattern, longest_prompt
from trd_lightning.data.sampler import ResumableSampler
from trd_lightning.diagnostics import first_divergence
from trd_lightning.groups import as_group
from trd_lightning.hf import load_tokenizer
from trd_lightning.offline import check_round
from trd_lightning.rollout.assemble import assemble
from trd_lightning.rollout.batch import (
    DistillBatch,
    PromptBatch,
    Prompts,
    RolloutModels,
    RolloutSpec,
    StepInfo,
    ValidationRollouts,
)
from trd_lightning.rollout.engines import Generator, LocalEngine, end_token_ids
from trd_lightning.rollout.overlap import Overlap
from trd_lightning.rollout.rewrite import ModelRewriter, RefinePrompt, Rewriter, WrittenRewriter
from trd_lightning.rollout.seeds import row_seeds, uniforms
from trd_lightning.rollout.selection import RefinementPlan, select_for_refinement
from trd_lightning.rollout.sources import RolloutSource, StudentRollouts, WrittenRollouts, rollout_stats
from trd_lightning.verify import Verifier, make_verifier

if TYPE_CHECKING:
    from trd_lightning.serve.generator import ServedEngine
    from trd_lightning.serve.student import WeightSync

# Resuming mid-epoch is exact here: ``state_dict`` below keeps the batches consumed, and the next epoch's sampler
# skips them, which Lightning cannot see from the DataLoader.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


class OnPolicyDataModule(L.LightningDataModule):
    """Prompt datasets for on-policy distillation, and the rollout pipeline that turns a step's prompts into its batch.

    Each training batch holds the prompts of one optimizer step (a ``PromptBatch``). In the module's
    ``on_train_batch_start``, ``produce`` runs the pipeline: the rollout source (the student's sampler, or a written
    round), verification, selection (the ``RefinementScheduler``'s plan), the rewrite (TRD) and assembly, and returns
    a ``DistillBatch`` with identical response ids on the student and the teacher side.

    Args:
        tokenizer: name or path of the student's tokenizer (linked to ``model.student`` by the CLI).
        train_data: ``trd-demo``, a local json/jsonl/parquet/csv file or saved dataset folder, or a hub name.
        train_split: the split to train on.
        subset: the hub dataset's configuration name, when it has several.
        problem_column: the column holding the problem text.
        solution_column: the column holding the reference solution (needed for ``teacher_context: privileged``).
        answer_column: the column holding the final answer, for accuracy; None when there is none.
        answer_pattern: a regular expression whose first group is the final answer inside an answer column that
            holds more, e.g. ``(?:####)\\s*(.+)`` for GSM8K (start it with a group, not ``#``: a value read from
            YAML that starts with ``#`` is a comment); its last match is used. None keeps answers as they are.
        teacher_context: ``prompt`` (OPD: the teacher sees what the student sees) or ``privileged`` (OPSD: the
            teacher also sees the reference solution).
        task: how answers are checked, and which default refine prompt TRD uses: ``math`` (math-verify), ``code``
            (the answer column holds tests; programs run sandboxed, see ``code``) or ``none`` (nothing checked).
        code_format: a code dataset's row format: ``taco``, ``humaneval``, ``mbpp`` or ``livecodebench`` (its hub
            columns become the problem, the reference program and the tests; the column options are then not used).
        code: how programs are checked (``task: code``).
        batch_size: prompts per optimizer step on each device.
        prompt: prompt templates, chat-template arguments and length limits.
        rollout: how rollouts are sampled and how every generation runs.
        refine: Trajectory-Refined Distillation (off unless ``refine.enabled``).
        validation: what validation samples, and on which data.
        seed: seed of the data order and of every rollout (each row's rollout is seeded from it, the step and the
            row; see ``trd_lightning.rollout.seeds``).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        tokenizer: str = "trd-demo/student",
        train_data: str = "trd-demo",
        train_split: str = "train",
        subset: str | None = None,
        problem_column: str = "problem",
        solution_column: str | None = "solution",
        answer_column: str | None = "answer",
        answer_pattern: str | None = None,
        teacher_context: Literal["prompt", "privileged"] = "prompt",
        task: Task = "math",
        code_format: CodeFormat | None = None,
        code: CodeOptions = CodeOptions(),
        batch_size: int = 8,
        prompt: PromptOptions = PromptOptions(),
        rollout: RolloutOptions = RolloutOptions(),
        refine: RefineOptions = RefineOptions(),
        validation: ValidationOptions = ValidationOptions(),
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # Each group may also be a plain dict of its settings (from Python; LightningCLI builds the dataclasses).
        prompt = as_group(PromptOptions, prompt, "data.prompt")
        rollout = as_group(RolloutOptions, rollout, "data.rollout")
        refine, code = as_group(RefineOptions, refine, "data.refine"), as_group(CodeOptions, code, "data.code")
        validation = as_group(ValidationOptions, validation, "data.validation")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be at least 1, got {batch_size}.")
        check_answer_pattern(answer_pattern)
        if teacher_context == "privileged":
            if solution_column is None:
                raise ValueError(
                    "teacher_context: privileged (OPSD) shows the teacher the reference solution, but solution_column "
                    "is None: set data.solution_column to the dataset's reference-solution column."
                )
            templates.check_template(prompt.privileged_template, {"problem", "solution"}, "privileged")
        if rollout.url and refine.offline_round:
            raise ValueError("data.refine.offline_round trains on written rollouts: it needs no data.rollout.url.")
        if rollout.max_staleness and refine.enabled and not refine.url:
            raise ValueError(
                "data.rollout.max_staleness: 1 makes the next step's rewrites while this step trains, which the "
                "trainer's own refiner cannot do: serve the refiner (data.refine.url), or set max_staleness: 0."
            )
        if refine.offline_round and rollout.num_generations != 1:
            raise ValueError(
                "data.refine.offline_round holds one rollout per prompt: set data.rollout.num_generations: 1."
            )
        kind = "code" if task == "code" else "math"
        self.refine_template = refine.template or templates.REFINE_TEMPLATES[(teacher_context, kind)]
        if refine.enabled:
            slots = {"problem", "initial"} | ({"solution"} if teacher_context == "privileged" else set())
            templates.check_template(self.refine_template, slots, "refine")
        # The groups as typed objects: under LightningCLI ``hparams`` holds them as the config's plain dicts.
        self.prompt, self.rollout, self.refine, self.validation, self.code = prompt, rollout, refine, validation, code
        options = code.verifier_options() if task == "code" else {}
        self.verifier: Verifier | None = make_verifier(task, **options)
        val_task = validation.task or task
        val_options = code.verifier_options() if val_task == "code" else {}
        self.val_verifier: Verifier | None = make_verifier(val_task, **val_options)
        self.plan = RefinementPlan()
        self.tokenizer = None
        self.train_rows: list[dict] | None = None
        self.val_rows: list[dict] | None = None
        self.test_rows: list[dict] | None = None
        self.longest_prompt = 0
        self.source: RolloutSource | None = None
        self.rewriter: Rewriter | None = None
        self.served_refiner: Generator | None = None  # connected in setup when data.refine.url is set
        self.served_student: ServedEngine | None = None  # connected in setup when data.rollout.url is set
        self.weight_sync: WeightSync | None = None
        self.overlap = Overlap() if rollout.max_staleness else None
        self._skip = 0

    # ------------------------------------------------------------------ data
    def setup(self, stage: str) -> None:
        hp = self.hparams
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(hp.tokenizer)
            self._build_stages()
        if self.refine.url and self.served_refiner is None and self.refines:  # checked before any weights load
            from trd_lightning.serve.generator import connect  # the serve extra, needed only here

            needed = self.refine.max_prompt_length + self.refine.sampling(self.rollout).max_new_tokens
            self.served_refiner = connect(
                self.refine.url, self.refine.service, self.tokenizer, hp.tokenizer, needed, "data.refine.url"
            )
        if stage == "fit" and self.train_rows is None:
            if self.refine.offline_round:
                check_round(self.refine.offline_round)  # a complete round, or an error with the command that ends it
                self.train_rows = self._prepare(self.refine.offline_round, "train", offline=True)
            else:
                self.train_rows = self._prepare(hp.train_data, hp.train_split)
        if stage == "fit" and self.rollout.url and self.served_student is None:  # before any weights load
            from trd_lightning.serve.student import connect_student  # the serve extra, needed only here

            world = self.trainer.world_size if self.trainer is not None else 1
            needed = self.longest_prompt + self.rollout.max_new_tokens
            self.served_student, self.weight_sync = connect_student(
                self.rollout, self.tokenizer, hp.tokenizer, needed, world
            )
        val = self.validation
        if stage in ("fit", "validate") and self.val_rows is None and val.split is not None:
            self.val_rows = _first(self._prepare(val.data or hp.train_data, val.split, val=True), val.max_prompts)
        if stage == "test" and self.test_rows is None:
            if val.test_split is None:
                raise ValueError("trd test evaluates data.validation.test_split: set it to the dataset's test split.")
            self.test_rows = _first(self._prepare(val.data or hp.train_data, val.test_split, val=True), val.max_prompts)

    def _build_stages(self) -> None:
        tok = self.tokenizer
        if self.refine.offline_round:
            self.source = WrittenRollouts(tok, self.rollout.max_new_tokens, tok.eos_token_id)
        else:
            self.source = StudentRollouts(tok, self.rollout.sampling)
        if not self.refine.enabled:
            return
        prompt = RefinePrompt(
            tok,
            self.refine_template,
            self.refine.max_prompt_length,
            self.prompt.use_chat_template,
            merged_kwargs(self.prompt.teacher_kwargs, self.refine.chat_template_kwargs),
        )
        if self.refine.offline_round:
            self.rewriter = WrittenRewriter(prompt, self.rollout.max_new_tokens, tok.eos_token_id)
        else:
            self.rewriter = ModelRewriter(prompt, self.refine.sampling(self.rollout))

    def _prepare(self, source: str, split: str, offline: bool = False, val: bool = False):
        """Load, check and tokenize one split (``data.prepare.prepare_split``)."""
        rows = prepare_split(self.hparams, self.prompt, self.validation, self.tokenizer, source, split, offline, val)
        self.longest_prompt = max(self.longest_prompt, longest_prompt(rows))
        return rows

    def spec(self) -> RolloutSpec:
        """What ``produce`` will make, known after ``setup`` and before any weights load."""
        hp = self.hparams
        refine_tokens = self.refine.max_prompt_length + self.refine.sampling(self.rollout).max_new_tokens
        return RolloutSpec(
            rollouts_per_step=hp.batch_size * self.rollout.num_generations,
            teacher_context=hp.teacher_context,
            longest_prompt=self.longest_prompt,
            max_new_tokens=self.rollout.max_new_tokens,
            refine_tokens=refine_tokens if self.refine.enabled else None,
            validation_samples=self.validation.samples,
            verifies=self.verifier is not None and (hp.answer_column is not None or hp.code_format is not None),
            refines=self.refine.enabled,
        )

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
        loader = self._loader(self.train_rows, self.hparams.batch_size, sampler=sampler, drop_last=True)
        return self.overlap.loader(loader) if self.overlap else loader

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_rows, self.validation.batch_size) if self.val_rows else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_rows, self.validation.batch_size)

    def _loader(self, rows: list[dict], batch_size: int, **kwargs) -> DataLoader:
        return DataLoader(
            rows, batch_size=batch_size, collate_fn=self.collate, num_workers=self.hparams.num_workers, **kwargs
        )

    def collate(self, rows: list[dict]) -> PromptBatch:
        pad = self.tokenizer.pad_token_id
        offline = "y_o" in rows[0]
        return PromptBatch(
            prompts=Prompts.from_lists([r["prompt_ids"] for r in rows], pad),
            contexts=Prompts.from_lists([r["teacher_ids"] for r in rows], pad),
            index=torch.tensor([r["index"] for r in rows]),
            problem=[r["problem"] for r in rows],
            solution=[r["solution"] for r in rows],
            answer=[r["answer"] for r in rows],
            y_o=[r["y_o"] for r in rows] if offline else None,
            y_r=[r["y_r"] for r in rows] if offline else None,
        )

    # -------------------------------------------------------------- the step
    def plan_refinement(self, plan: RefinementPlan) -> None:
        """Set how much and what the next steps refine (``RefinementScheduler`` calls it before every step)."""
        self.plan = plan

    def produce(self, batch: PromptBatch, models: RolloutModels, step: StepInfo) -> DistillBatch:
        """The step's batch from its prompts: rollouts, their verdicts, the plan's choice, rewrites, assembly.

        With a served student its engine first gets the student's current weights; with overlap the batch comes
        from the background (made one step earlier), and the next step's starts there.
        """
        start = time.perf_counter()
        # The trainer's student scores rewrites (the support guard, refine/student_logprob): the engine only samples.
        local = self._engine(models.student, step)
        if self.served_student is None:
            made = self._make(batch, models, step, local, local, step.step)
        else:
            if self.overlap and (self.plan.mode == "divergent" or self.plan.min_student_logprob is not None):
                raise ValueError(
                    "RefinementScheduler mode: divergent and min_student_logprob score with the trainer's models, "
                    "which an overlapped step, made while they train, cannot use: use mode all or incorrect without "
                    "min_student_logprob, or data.rollout.max_staleness: 0."
                )
            made = self.overlap.take(batch) if self.overlap else None
            sync_seconds = self.weight_sync.push(models.student, step.step)
            if made is None:
                made = self._make(batch, models, step, self.served_student, local, step.step)
            if self.overlap:
                following = StepInfo(step.step + 1, step.rank, step.world_size)
                served = self.served_student
                self.overlap.start(batch, lambda b: self._make(b, models, following, served, None, step.step))
            made.stats["perf/sync_seconds"] = sync_seconds
        made.stats["perf/produce_seconds"] = time.perf_counter() - start
        return made

    def _make(
        self,
        batch: PromptBatch,
        models: RolloutModels,
        step: StepInfo,
        student: Generator,
        scorer: Generator | None,
        version: int,
    ) -> DistillBatch:
        """The pipeline for one step's prompts: ``student`` generates from the weights of ``version``, ``scorer``
        (the trainer's student, or None in the background) scores the rewrites."""
        hp, n = self.hparams, self.rollout.num_generations
        rows = batch.repeat(n)
        start = time.perf_counter()
        y_o, texts = self.source.rollouts(rows, row_seeds(hp.seed, step.step, "rollout", batch.index, n), student)
        correct = self.verify(texts, rows.answer)
        stats = rollout_stats(y_o, correct, time.perf_counter() - start)
        if self.source.sampled:
            stats.update({"rollout/weight_version": version, "rollout/staleness": step.step - version})
        rewrites = None
        if self.rewriter is not None:
            start = time.perf_counter()
            chosen = self._choose(rows, y_o, correct, models, step)
            seeds = row_seeds(hp.seed, step.step, "refine", batch.index, n)
            with self._refiner(models, step) as refiner:
                rewrites = self.rewriter.rewrite(
                    rows, y_o, texts, chosen, seeds, refiner, scorer, self.plan.min_student_logprob
                )
            after = self.verify(rewrites.texts, [rows.answer[i] for i in rewrites.rows])
            if correct is not None and chosen:
                stats["refine/accuracy_before"] = sum(correct[i] for i in chosen) / len(chosen)
                stats["refine/accuracy_after"] = sum(after) / len(after)
            stats["perf/refine_seconds"] = time.perf_counter() - start
            stats.update(rewrites.stats)
        pad = self.tokenizer.pad_token_id
        made = assemble(rows, y_o, self.source.sampled, texts, rewrites, self.refine.teacher_context, pad, n, stats)
        made.weight_version = torch.full((len(y_o),), version if self.source.sampled else -1, dtype=torch.long)
        return made

    def validation_rollouts(self, batch: PromptBatch, models: RolloutModels, step: StepInfo) -> ValidationRollouts:
        """k answers per validation prompt from the student, seeded by the prompt (the same at every validation)."""
        hp, k = self.hparams, self.validation.samples
        rows = batch.repeat(k)
        seeds = row_seeds(hp.seed, 0, "validation", batch.index, k)
        out = self._engine(models.student, step).generate(rows.prompts, self.validation.sampling(self.rollout), seeds)
        texts = self.tokenizer.batch_decode(out.ids, skip_special_tokens=True)
        correct = self.verify(texts, rows.answer, self.val_verifier)
        verdicts = None if correct is None else torch.tensor(correct, device=out.ids.device).view(-1, k)
        return ValidationRollouts(texts, verdicts, out.mask.sum(-1).float())

    def _engine(self, model, step: StepInfo) -> Generator:
        eos = end_token_ids(model, self.tokenizer)
        return LocalEngine(model, eos, self.tokenizer.pad_token_id, self.rollout.engine, step.world_size > 1)

    @contextlib.contextmanager
    def _refiner(self, models: RolloutModels, step: StepInfo) -> Iterator[Generator]:
        if self.served_refiner is not None:
            yield self.served_refiner
            return
        with models.refiner() as model:
            yield self._engine(model, step)

    def teardown(self, stage: str) -> None:
        if self.overlap is not None:
            self.overlap.close()
            self.overlap = Overlap()  # a later fit in this process starts afresh

    @property
    def serves_rollouts(self) -> bool:
        """Whether a service generates the student's rollouts (``data.rollout.url``)."""
        return bool(self.rollout.url) and not self.refine.offline_round

    @property
    def refines(self) -> bool:
        """Whether rewrites are generated (TRD online, not an offline round)."""
        return self.refine.enabled and not self.refine.offline_round

    @property
    def serves_refiner(self) -> bool:
        """Whether a service generates the rewrites (``data.refine.url``)."""
        return self.refines and bool(self.refine.url)

    @property
    def refines_in_process(self) -> bool:
        """Whether the module's refiner generates the rewrites."""
        return self.refines and not self.refine.url

    def _choose(self, rows: PromptBatch, y_o, correct, models: RolloutModels, step: StepInfo) -> list[int]:
        plan, n = self.plan, self.rollout.num_generations
        draws = uniforms(row_seeds(self.hparams.seed, step.step, "select", rows.index[::n], n), 1)[:, 0]
        divergent = None
        if plan.mode == "divergent":
            with models.scorer() as scorer:
                logprobs = self._engine(scorer, step).logprobs(rows.contexts, y_o)
            divergent = (first_divergence(logprobs, y_o.mask, plan.divergence_logprob) >= 0).tolist()
        chosen = select_for_refinement(plan, draws, correct, divergent)
        return [i for i, c in enumerate(chosen) if c]

    def verify(self, texts: list[str | None], answers: list[str | None], verifier=None) -> list[bool] | None:
        """Whether each response is correct (one batch call: programs are checked concurrently); None without a
        verifier or when an answer is missing. ``verifier`` defaults to the training data's."""
        verifier = verifier or self.verifier
        if verifier is None or any(a is None for a in answers):
            return None
        present = [i for i, t in enumerate(texts) if t is not None]
        verdicts = dict(zip(present, verifier([texts[i] for i in present], [answers[i] for i in present])))
        return [verdicts.get(i, False) for i in range(len(texts))]

    # ------------------------------------------------------------ resumption
    def state_dict(self) -> dict[str, Any]:
        # Lightning's own count of the batches this epoch has trained on, read when the checkpoint is written.
        # A checkpoint at the end of an epoch resumes at the start of the next one, with nothing to skip.
        consumed = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"consumed_batches": consumed if consumed < self.trainer.num_training_batches else 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The next train_dataloader starts this epoch's order where the checkpoint left it.
        self._skip = state["consumed_batches"] * self.hparams.batch_size


def _first(rows, limit: int | None):
    """The first ``limit`` rows of a dataset (all of them for None)."""
    return rows if limit is None else rows.select(range(min(limit, len(rows))))
