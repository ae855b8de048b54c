"""Bad inputs fail fast: a ValueError that names the fix, raised before any model weights are loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import fit_one_step

from trd_lightning import DistillationModule, OnPolicyDataModule
from trd_lightning.data.options import PromptOptions, RefineOptions, RolloutOptions, ValidationOptions
from trd_lightning.prompts import STUDENT_TEMPLATE

# The tiny models of conftest.py have this many positions.
POSITIONS = 512


pytestmark = pytest.mark.usefixtures("no_weights")


def vocab_size(path: str) -> int:
    return json.loads((Path(path) / "config.json").read_text())["vocab_size"]


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------ controls


def test_valid_inputs_reach_the_weight_loader(make_run, tiny, tmp_path):
    """The control for every case below: with good inputs the run gets as far as loading weights, so the
    ValueErrors below come from the bad input and not from something else that is broken."""
    with pytest.raises(AssertionError, match="weights loaded"):
        fit_one_step(make_run)


# ------------------------------------------------------------------ models


def test_vocabulary_mismatch(make_run, tiny, tmp_path):
    with pytest.raises(ValueError, match="pick a teacher that shares the student's tokenizer and vocabulary size"):
        fit_one_step(make_run, model={"teacher": tiny["other_vocab"]})


def test_vocabulary_mismatch_names_both_sizes(make_run, tiny, tmp_path):
    student, teacher = vocab_size(tiny["student"]), vocab_size(tiny["other_vocab"])
    assert student != teacher  # otherwise the fixture does not exercise the check
    with pytest.raises(ValueError) as err:
        fit_one_step(make_run, model={"teacher": tiny["other_vocab"]})
    message = str(err.value)
    assert f"vocabulary of {student}" in message
    assert f"one of {teacher}" in message


@pytest.mark.parametrize("beta", [-0.1, 1.5])
def test_beta_outside_unit_interval(make_run, tiny, tmp_path, beta):
    with pytest.raises(ValueError, match=r"model\.beta must be in \[0, 1\]"):
        make_run(model={"beta": beta})


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_beta_bounds_are_allowed(beta):
    # Forward KL (0) and reverse KL (1) are the two ends of the range, not errors.
    assert DistillationModule(student="s", teacher="t", beta=beta).hparams.beta == beta


def test_frozen_teacher_needs_a_teacher():
    with pytest.raises(ValueError, match=r"teacher_kind: frozen needs model\.teacher"):
        DistillationModule(student="s", teacher=None, teacher_kind="frozen")


def test_shared_teacher_with_prompt_context(make_run, tiny, tmp_path):
    with pytest.raises(ValueError, match=r"set data\.teacher_context: privileged"):
        fit_one_step(make_run, model={"teacher": None, "teacher_kind": "shared"}, data={"teacher_context": "prompt"})


@pytest.mark.parametrize(("batch", "generations", "micro"), [(4, 1, 3), (4, 2, 3), (3, 1, 2)])
def test_micro_batch_must_divide_the_rollouts(make_run, tiny, tmp_path, batch, generations, micro):
    rollouts = batch * generations
    match = rf"micro_batch_size={micro} does not divide the {rollouts} rollouts.*pick a divisor"
    with pytest.raises(ValueError, match=match):
        data = {"batch_size": batch, "rollout": {"num_generations": generations}}
        fit_one_step(make_run, model={"micro_batch_size": micro}, data=data)


def test_micro_batch_dividing_the_rollouts_is_accepted(make_run, tiny, tmp_path):
    # Micro-batches split rollouts, not prompts: 2 divides the 3 x 2 = 6 rollouts though not the 3 prompts.
    with pytest.raises(AssertionError, match="weights loaded"):
        fit_one_step(make_run, model={"micro_batch_size": 2}, data={"batch_size": 3, "rollout": {"num_generations": 2}})


def test_a_token_budget_needs_no_dividing_micro_batch(make_run, tiny, tmp_path):
    with pytest.raises(AssertionError, match="weights loaded"):
        fit_one_step(make_run, model={"micro_batch_size": 3, "micro_batch_tokens": 256}, data={"batch_size": 4})


# ------------------------------------------------------------------ lengths


def longest_student_prompt(tiny) -> int:
    """The longest chat-formatted student prompt of the train file, measured without the datamodule."""
    from trd_lightning.hf import load_tokenizer

    tok = load_tokenizer(tiny["student"])
    return max(
        len(
            tok.apply_chat_template(
                [{"role": "user", "content": STUDENT_TEMPLATE.replace("{problem}", row["problem"])}],
                add_generation_prompt=True,
                tokenize=True,
            )["input_ids"]
        )
        for row in read_jsonl(tiny["train"])
    )


def test_prompt_plus_new_tokens_over_the_positions(make_run, tiny, tmp_path):
    longest = longest_student_prompt(tiny)
    with pytest.raises(ValueError, match=rf"\({longest} tokens\).*lower data\.rollout\.max_new_tokens"):
        fit_one_step(make_run, data={"rollout": {"max_new_tokens": POSITIONS - longest + 1}})


def test_prompt_plus_new_tokens_exactly_at_the_positions(make_run, tiny, tmp_path):
    # The boundary: a sequence that fills every position exactly is allowed.
    longest = longest_student_prompt(tiny)
    with pytest.raises(AssertionError, match="weights loaded"):
        fit_one_step(make_run, data={"rollout": {"max_new_tokens": POSITIONS - longest}})


def test_every_prompt_too_long(make_run, tiny, tmp_path):
    with pytest.raises(ValueError, match=r"max_prompt_length=3 tokens: raise data\.max_prompt_length"):
        fit_one_step(make_run, data={"prompt": {"max_prompt_length": 3}})


# ------------------------------------------------------------------ data


def test_unknown_problem_column(make_run, tiny, tmp_path):
    match = r"problem_column='question'.*'problem', 'solution', 'answer'.*set the column names"
    with pytest.raises(ValueError, match=match):
        fit_one_step(make_run, data={"problem_column": "question"})


def test_privileged_context_without_solution_column():
    with pytest.raises(ValueError, match=r"set data\.solution_column"):
        OnPolicyDataModule(teacher_context="privileged", solution_column=None)


def test_privileged_context_on_a_file_without_solutions(make_run, tiny, tmp_path):
    file = tmp_path / "no_solution.jsonl"
    rows = [{"problem": r["problem"], "answer": r["answer"]} for r in read_jsonl(tiny["train"])[:8]]
    file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match=r"solution_column='solution'.*set the column names"):
        fit_one_step(
            make_run,
            model={"teacher": None, "teacher_kind": "shared"},
            data={"train_data": str(file), "teacher_context": "privileged"},
        )


def test_prompt_context_on_a_file_without_solutions_is_accepted(make_run, tiny, tmp_path):
    # OPD never shows the solution, so a dataset without one is fine there.
    file = tmp_path / "no_solution.jsonl"
    rows = [{"problem": r["problem"], "answer": r["answer"]} for r in read_jsonl(tiny["train"])[:8]]
    file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(AssertionError, match="weights loaded"):
        fit_one_step(make_run, data={"train_data": str(file)})


def test_empty_dataset(make_run, tiny, tmp_path):
    file = tmp_path / "empty.csv"
    file.write_text("problem,solution,answer\n")
    with pytest.raises(ValueError, match="empty"):
        fit_one_step(make_run, data={"train_data": str(file)})


def test_student_template_without_problem_slot():
    with pytest.raises(ValueError, match=r"student template must contain \{problem\}"):
        PromptOptions(student_template="Solve it. Put the answer in \\boxed{}.")


def test_refine_prompt_over_the_positions(make_run, tiny, tmp_path):
    refine = {"enabled": True, "max_prompt_length": POSITIONS - 11, "max_new_tokens": 12}
    with pytest.raises(ValueError, match=r"\(513 in all\).*lower data\.refine\.max_prompt_length"):
        fit_one_step(make_run, data={"refine": refine})
    refine["max_prompt_length"] = POSITIONS - 12
    with pytest.raises(AssertionError, match="weights loaded"):
        fit_one_step(make_run, data={"refine": refine})


@pytest.mark.parametrize(
    ("model", "match"),
    [
        ({"lr": 0.0}, r"model\.lr must be > 0"),
        ({"lr": -1e-5}, r"model\.lr must be > 0"),
        ({"weight_decay": -0.1}, r"model\.weight_decay must be >= 0"),
        ({"betas": (0.9, 1.0)}, r"model\.betas must be two numbers in \[0, 1\)"),
        ({"warmup_ratio": 1.0}, r"model\.warmup_ratio must be in \[0, 1\)"),
        ({"min_lr_ratio": 1.5}, r"model\.min_lr_ratio must be in \[0, 1\]"),
        ({"max_grad_norm": 0.0}, r"model\.max_grad_norm must be > 0"),
        ({"micro_batch_tokens": 0}, r"model\.micro_batch_tokens must be at least 1"),
    ],
)
def test_optimizer_and_step_settings_are_checked_at_construction(model, match):
    with pytest.raises(ValueError, match=match):
        DistillationModule(student="s", teacher="t", **model)


@pytest.mark.parametrize(
    ("group", "values", "match"),
    [
        (RolloutOptions, {"num_generations": 0}, r"data\.rollout\.num_generations must be at least 1"),
        (RolloutOptions, {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        (RolloutOptions, {"max_generation_rows": 0}, r"max_generation_rows"),
        (ValidationOptions, {"samples": 0}, r"data\.validation\.samples must be at least 1"),
        (PromptOptions, {"max_prompt_length": 0}, r"data\.prompt\.max_prompt_length must be at least 1"),
        (RefineOptions, {"max_prompt_length": 0}, r"data\.refine\.max_prompt_length must be at least 1"),
    ],
)
def test_option_groups_check_their_values(group, values, match):
    with pytest.raises(ValueError, match=match):
        group(**values)


def test_refine_template_without_its_slots():
    with pytest.raises(ValueError, match=r"refine template must contain \{initial\}"):
        OnPolicyDataModule(refine=RefineOptions(enabled=True, template="{problem} only"))
    with pytest.raises(ValueError, match=r"refine template must contain \{solution\}"):
        OnPolicyDataModule(
            teacher_context="privileged", refine=RefineOptions(enabled=True, template="{problem} {initial}")
        )
