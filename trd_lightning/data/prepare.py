"""The dataset side of a step's prompts: one split loaded, its columns checked, its rows formatted and tokenized."""

from __future__ import annotations

from trd_lightning.data.code_rows import code_dataset
from trd_lightning.data.options import PromptOptions, ValidationOptions
from trd_lightning.data.rows import RowFormat, prepare_rows
from trd_lightning.data.sources import check_columns, load_rows


def prepare_split(
    hp,
    prompt: PromptOptions,
    validation: ValidationOptions,
    tokenizer,
    source: str,
    split: str,
    offline: bool = False,
    val: bool = False,
):
    """The rows of ``source``'s ``split``, loaded, checked and tokenized as the DataModule's settings say.

    Args:
        hp: the DataModule's hyperparameters (columns, subset, code format, teacher context, answer pattern).
        prompt: the prompt templates and budgets.
        validation: the validation settings (their columns and subset, for ``val``).
        tokenizer: the student's tokenizer.
        source: a dataset name, file or folder.
        split: the split.
        offline: an offline round (fixed column names, ``y_o``/``y_r`` among them).
        val: a validation or test split (the student's prompt only).
    """
    option = "data.refine.offline_round" if offline else "data.validation.data" if val and validation.data else None
    subset = None if offline else (validation.subset if val else hp.subset)
    dataset = load_rows(source, split, subset, option or "data.train_data")
    columns = {"problem": hp.problem_column, "solution": hp.solution_column, "answer": hp.answer_column}
    if val:
        columns.update(problem=validation.problem_column or hp.problem_column, solution=None)
        columns["answer"] = validation.answer_column or hp.answer_column
    code_format = (validation.code_format if val else None) or hp.code_format
    if code_format and not offline:
        dataset = code_dataset(dataset, code_format, source)
        columns = {"problem": "problem", "solution": None if val else "solution", "answer": "answer"}
    if offline:
        answer = "answer" if hp.answer_column else None  # rows need answers only where answers are used
        columns = {"problem": "problem", "solution": "solution", "answer": answer, "y_o": "y_o", "y_r": "y_r"}
    elif hp.teacher_context != "privileged" and not val:
        columns["solution"] = None if hp.solution_column not in dataset.column_names else hp.solution_column
    check_columns(dataset, columns, source)
    # Validation prompts the student alone: no teacher prompt to build.
    privileged = prompt.privileged_template if hp.teacher_context == "privileged" and not val else None
    fmt = RowFormat(
        prompt.student_template,
        privileged,
        prompt.max_prompt_length,
        prompt.max_teacher_prompt_length,
        prompt.use_chat_template,
        prompt.chat_template_kwargs,
        None if val else prompt.teacher_chat_template_kwargs,
        hp.answer_pattern,
    )
    return prepare_rows(dataset, columns, tokenizer, fmt, f"{source!r} split {split!r}")
