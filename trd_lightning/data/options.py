"""The DataModule's option groups: prompts, rollout sampling, refinement and validation (each shows in ``--help``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from trd_lightning import prompts as templates
from trd_lightning.rollout.engines import EngineOptions
from trd_lightning.rollout.sampling import SamplingConfig
from trd_lightning.serve.options import ServiceOptions, check_url
from trd_lightning.verify.sandbox import Limits

Task = Literal["math", "code", "none"]
CodeFormat = Literal["taco", "humaneval", "mbpp", "livecodebench"]


@dataclass(frozen=True)
class PromptOptions:
    """How prompts are written and how long they may be.

    Args:
        student_template: the student's prompt, with a ``{problem}`` slot.
        privileged_template: the privileged teacher prompt (OPSD), with ``{problem}`` and ``{solution}`` slots.
        use_chat_template: wrap prompts as a user turn when the tokenizer has a chat template.
        chat_template_kwargs: extra ``apply_chat_template`` arguments of the student's prompt, and of every other
            prompt unless overridden (e.g. ``{enable_thinking: false}``).
        teacher_chat_template_kwargs: arguments that override ``chat_template_kwargs`` for the teacher's (privileged)
            prompt (e.g. ``{enable_thinking: true}`` for a thinking teacher beside a non-thinking student).
        max_prompt_length: the longest student prompt in tokens; longer problems are dropped (never cut).
        max_teacher_prompt_length: the longest teacher prompt; the reference solution's tail is cut to fit.
    """

    student_template: str = templates.STUDENT_TEMPLATE
    privileged_template: str = templates.PRIVILEGED_TEMPLATE
    use_chat_template: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    teacher_chat_template_kwargs: dict[str, Any] | None = None
    max_prompt_length: int = 512
    max_teacher_prompt_length: int = 1024

    def __post_init__(self) -> None:
        templates.check_template(self.student_template, {"problem"}, "student")
        for name in ("max_prompt_length", "max_teacher_prompt_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.prompt.{name} must be at least 1, got {getattr(self, name)}.")

    @property
    def teacher_kwargs(self) -> dict[str, Any] | None:
        return (
            self.chat_template_kwargs
            if self.teacher_chat_template_kwargs is None
            else self.teacher_chat_template_kwargs
        )


@dataclass(frozen=True)
class RolloutOptions:
    """How the student's rollouts are sampled, and how every generation runs (rollouts, rewrites, validation).

    Args:
        num_generations: rollouts sampled per prompt.
        max_new_tokens: the longest rollout.
        temperature: rollout sampling temperature.
        top_p: rollout nucleus sampling mass.
        top_k: rollout top-k sampling (0 turns it off).
        decoder: ``native`` (a plain decoding loop with a dynamic key/value cache) or ``generate`` (Hugging Face's,
            for ``generation_cache: static`` and ``compile_generation``). Both draw the same tokens for a seed.
        generation_cache: ``generate``'s key/value cache: ``dynamic`` or ``static`` (allocated once at full length).
        compile_generation: ``torch.compile`` the decoding steps of ``generate`` (needs ``generation_cache: static``).
        max_generation_rows: the most rows any generation runs at once (rollouts, rewrites, validation); more run in
            chunks, which bounds the key/value cache. Rollouts do not depend on it. None: all rows of a call at once.
        url: the address of an engine that generates the student's rollouts (vLLM or ``trd serve``; see the
            README); after every optimizer step it gets the student's new weights: a LoRA adapter through
            ``/v1/load_lora_adapter``, full weights through ``/collective_rpc`` ``reload_weights``. None: in-process.
        service: timeout, retries, backoff and concurrency of the engine's requests.
        sync_dir: the folder the student's weights are written to for the engine, one the engine can read (a
            shared filesystem for an engine on another machine); None: a new temporary folder.
        adapter_name: the name the engine serves a LoRA student's adapter under.
        max_staleness: 0 generates each step's rollouts from the current weights. 1 overlaps: the rollouts,
            verdicts and rewrites of step t+1 are produced (by the served engine and refiner) while step t trains,
            from the weights after step t-1; needs ``url``, and a served refiner (``data.refine.url``) with TRD.
    """

    num_generations: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    decoder: Literal["native", "generate"] = "native"
    generation_cache: Literal["dynamic", "static"] = "dynamic"
    compile_generation: bool = False
    max_generation_rows: int | None = None
    url: str | None = None
    service: ServiceOptions = ServiceOptions()
    sync_dir: str | None = None
    adapter_name: str = "student"
    max_staleness: int = 0

    def __post_init__(self) -> None:
        if self.num_generations < 1:
            raise ValueError(f"data.rollout.num_generations must be at least 1, got {self.num_generations}.")
        check_url(self.url, "data.rollout.url")
        if self.max_staleness not in (0, 1):
            raise ValueError(
                f"data.rollout.max_staleness must be 0 (synchronous) or 1 (one step overlapped), got "
                f"{self.max_staleness}."
            )
        if self.max_staleness and not self.url:
            raise ValueError(
                "data.rollout.max_staleness: 1 overlaps generation with training on a served engine: set "
                "data.rollout.url (vLLM or trd serve), or max_staleness: 0."
            )
        # Built once here so that a bad value fails at construction, with its message.
        SamplingConfig(self.max_new_tokens, self.temperature, self.top_p, self.top_k)
        EngineOptions(self.decoder, self.generation_cache, self.compile_generation, self.max_generation_rows)

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.max_new_tokens, self.temperature, self.top_p, self.top_k)

    @property
    def engine(self) -> EngineOptions:
        return EngineOptions(self.decoder, self.generation_cache, self.compile_generation, self.max_generation_rows)


@dataclass(frozen=True)
class RefineOptions:
    """Trajectory-Refined Distillation: the refiner (the teacher for OPD, the initial student shown the reference for
    OPSD) rewrites the student's rollouts and the student learns the rewrites. How many and which are rewritten is
    set by the ``RefinementScheduler`` callback (default: all).

    Args:
        enabled: turn refinement on (the other settings wait until it is).
        template: the refine prompt, with ``{problem}``, ``{initial}`` and (OPSD) ``{solution}`` slots; None picks the
            default for the teacher context and ``data.task``.
        teacher_context: score ``y_r`` after the refine prompt (``refine``, the authors' choice) or after the
            rollout's usual teacher context (``original``).
        max_prompt_length: the refine prompt's budget; the attempt's tail is cut first, then the reference's.
        max_new_tokens: the longest rewrite (None: ``rollout.max_new_tokens``).
        temperature: the refiner's sampling temperature (0 is greedy).
        top_p: the refiner's nucleus sampling mass.
        top_k: the refiner's top-k sampling (0 turns it off).
        chat_template_kwargs: arguments that override the teacher prompt's chat-template arguments for the refine
            prompt.
        offline_round: train on a round written by ``trd refine`` (a folder of shards) instead of generating: the
            student learns each row's ``y_r``.
        url: the address of a served refiner (``trd serve``, or vLLM: see the README) that generates the rewrites
            from the same refine prompts and seeds; None refines in-process. ``trd serve`` draws the tokens
            in-process refinement draws for a seed; stock vLLM matches them for greedy decoding only.
        service: timeout, retries, backoff and concurrency of the served refiner's requests.
    """

    enabled: bool = False
    template: str | None = None
    teacher_context: Literal["refine", "original"] = "refine"
    max_prompt_length: int = 256
    max_new_tokens: int | None = None
    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20
    chat_template_kwargs: dict[str, Any] | None = None
    offline_round: str | None = None
    url: str | None = None
    service: ServiceOptions = ServiceOptions()

    def __post_init__(self) -> None:
        check_url(self.url, "data.refine.url")
        if self.url and self.offline_round:
            raise ValueError("data.refine.offline_round trains on written rewrites: it needs no data.refine.url.")
        if self.max_prompt_length < 1:
            raise ValueError(f"data.refine.max_prompt_length must be at least 1, got {self.max_prompt_length}.")
        if self.offline_round and not self.enabled:
            raise ValueError(
                "data.refine.offline_round trains on a written refinement round: set data.refine.enabled: true."
            )

    def sampling(self, rollout: RolloutOptions) -> SamplingConfig:
        return SamplingConfig(self.max_new_tokens or rollout.max_new_tokens, self.temperature, self.top_p, self.top_k)


@dataclass(frozen=True)
class CodeOptions:
    """How programs are checked when the task is ``code`` (``trd_lightning.verify.CodeVerifier``).

    Args:
        workers: programs run at once (a step's rollouts and a validation's samples are checked together); None: the
            CPUs this process may use.
        isolation: ``auto`` (bubblewrap's namespaces where it runs, else the plain limited process, with a warning),
            ``bwrap`` (an error where it cannot run) or ``process``.
        limits: each program run's resources: wall-clock seconds per test case, memory, processes, file and output
            sizes.
    """

    workers: int | None = None
    isolation: Literal["auto", "bwrap", "process"] = "auto"
    limits: Limits = Limits()

    def verifier_options(self) -> dict[str, Any]:
        return {"max_workers": self.workers, "isolation": self.isolation, "limits": self.limits}


@dataclass(frozen=True)
class ValidationOptions:
    """What validation samples, and on which data.

    Args:
        data: the dataset to validate on; None: ``data.train_data``.
        task: how its answers are checked (``math``, ``code`` or ``none``); None: ``data.task``.
        code_format: the code dataset's row format (``taco``, ``humaneval``, ``mbpp`` or ``livecodebench``: its columns
            become the problem, the reference and the tests); None: ``data.code_format``.
        split: the split to validate on; None turns validation off.
        test_split: the split ``trd test`` evaluates with the same metrics; None: no test split.
        subset: the validation dataset's configuration name (e.g. ``main`` for GSM8K).
        problem_column: its problem column; None: ``data.problem_column``.
        answer_column: its answer column; None: ``data.answer_column``.
        batch_size: prompts per validation batch.
        samples: responses sampled per prompt (k of avg@k and pass@k).
        temperature: validation sampling temperature (0 is greedy).
        top_p: validation nucleus sampling mass.
        top_k: validation top-k sampling (0 turns it off).
        max_new_tokens: the longest answer (None: ``rollout.max_new_tokens``).
        max_prompts: use at most this many validation prompts.
    """

    data: str | None = None
    task: Task | None = None
    code_format: CodeFormat | None = None
    split: str | None = "validation"
    test_split: str | None = None
    subset: str | None = None
    problem_column: str | None = None
    answer_column: str | None = None
    batch_size: int = 32
    samples: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int | None = None
    max_prompts: int | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.validation.{name} must be at least 1, got {getattr(self, name)}.")

    def sampling(self, rollout: RolloutOptions) -> SamplingConfig:
        return SamplingConfig(self.max_new_tokens or rollout.max_new_tokens, self.temperature, self.top_p, self.top_k)


# Checkpoints hold the option groups among the DataModule's hyperparameters: allowlisted, they load back under
# torch's weights-only unpickling (Lightning's default for ``ckpt_path``).
torch.serialization.add_safe_globals(
    [PromptOptions, RolloutOptions, RefineOptions, ValidationOptions, CodeOptions, Limits]
)
