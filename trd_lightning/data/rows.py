"""Dataset rows to prompt token ids: the student prompt, and the teacher's (privileged for OPSD).

``prepare_rows`` runs through ``datasets.map`` (batched, with workers, cached under a fingerprint of the dataset
and of every setting that shapes the ids), so a restart, and the other ranks after ``prepare_data``, read the
cache instead of tokenizing again.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, Features, Sequence, Value
from datasets.fingerprint import Hasher
from lightning.pytorch.utilities import rank_zero_info

from trd_lightning import prompts
from trd_lightning.data.alignment import check_alignment, encode_user_turns, merged_kwargs

# Why a row is dropped, in the order the checks run; 0 keeps it.
KEPT, NO_PROBLEM, NO_SOLUTION, NO_ANSWER, TOO_LONG = range(5)
_reported: set[str] = set()


@dataclass(frozen=True)
class RowFormat:
    """How a row becomes prompt ids.

    Args:
        student_template: the student prompt, with ``{problem}``.
        privileged_template: the OPSD teacher prompt (``{problem}``, ``{solution}``), or None when the teacher
            sees the student prompt.
        max_prompt_length: the student prompt's budget; longer rows are dropped (the problem is never cut).
        max_teacher_prompt_length: the privileged prompt's budget; the reference's tail is cut to fit.
        use_chat_template: wrap prompts as a user turn when the tokenizer has a chat template.
        chat_template_kwargs: ``apply_chat_template`` arguments of every prompt (e.g. ``{enable_thinking: false}``).
        teacher_chat_template_kwargs: arguments that override those for the teacher's prompt.
        answer_pattern: a regular expression whose first group is the final answer (see ``final_answer``).
    """

    student_template: str
    privileged_template: str | None
    max_prompt_length: int
    max_teacher_prompt_length: int
    use_chat_template: bool = True
    chat_template_kwargs: Mapping[str, Any] | None = None
    teacher_chat_template_kwargs: Mapping[str, Any] | None = None
    answer_pattern: str | None = None

    @property
    def teacher_kwargs(self) -> dict[str, Any]:
        return merged_kwargs(self.chat_template_kwargs, self.teacher_chat_template_kwargs)


def prepare_rows(
    dataset: Dataset,
    columns: Mapping[str, str | None],
    tokenizer,
    fmt: RowFormat,
    name: str,
    cache_dir: str | None = None,
    num_proc: int | None = None,
) -> Dataset:
    """The kept rows with their mapped text fields, ``index`` (the row's place in ``dataset``), ``prompt_ids`` and
    ``teacher_ids``.

    A row is dropped, counted and reported when its problem is missing or empty, when it has no reference solution
    and the teacher prompt shows one, when it has no answer and ``columns`` maps an answer column, or when its
    student prompt is over ``max_prompt_length``. More than half of the rows dropped is an error naming the fix.
    Call it from ``prepare_data`` and from ``setup``: the second call reads the first one's cache.

    Args:
        dataset: the split, as loaded by ``load_rows``.
        columns: field name to dataset column (None: the field is absent).
        tokenizer: the student's tokenizer.
        fmt: the prompt settings.
        name: how errors and messages name the split.
        cache_dir: the folder of the prepared rows' cache files; defaults to a folder in the ``datasets`` cache.
            Nothing is written when ``datasets`` caching is disabled.
        num_proc: worker processes for the tokenization (None: in this process).
    """
    if len(dataset) == 0:
        raise ValueError(f"Dataset {name} is empty: point the data config at rows to train on.")
    check_answer_pattern(fmt.answer_pattern)
    check_alignment(
        tokenizer,
        fmt.student_template,
        fmt.privileged_template,
        fmt.use_chat_template,
        fmt.chat_template_kwargs,
        fmt.teacher_chat_template_kwargs,
    )
    fingerprint = _fingerprint(dataset, columns, tokenizer, fmt)
    cache_file = None
    if datasets.is_caching_enabled():
        folder = Path(cache_dir or Path(datasets.config.HF_DATASETS_CACHE) / "trd_lightning" / "prompts")
        folder.mkdir(parents=True, exist_ok=True)
        cache_file = str(folder / f"{fingerprint}.arrow")
    prepared = dataset.map(
        _Tokenize(dict(columns), tokenizer, fmt),
        batched=True,
        batch_size=1000,
        with_indices=True,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        cache_file_name=cache_file,
        new_fingerprint=fingerprint,
        features=_features(columns),
        desc=f"Tokenizing {name}",
    )
    reasons = np.bincount(prepared.data.column("drop").to_numpy(), minlength=5)
    _report(reasons, columns, fmt, name, fingerprint)
    kept = np.flatnonzero(prepared.data.column("drop").to_numpy() == KEPT)
    return prepared.select(kept).remove_columns("drop")


def _features(columns: Mapping[str, str | None]) -> Features:
    # Given, not inferred: a field named like an input column would otherwise keep that column's type (float
    # answers read back as 27.0, not "27").
    ids = Sequence(Value("int32"))  # List in datasets 4+, Sequence in 3
    return Features(
        {
            **{k: Value("string") for k in columns},
            "index": Value("int64"),
            "prompt_ids": ids,
            "teacher_ids": ids,
            "drop": Value("int8"),
        }
    )


def longest_prompt(rows: Dataset) -> int:
    """The longest student or teacher prompt of prepared rows, in tokens."""
    table = rows.with_format("arrow")
    return max(pc.max(pc.list_value_length(table[c])).as_py() or 0 for c in ("prompt_ids", "teacher_ids"))


class _Tokenize:
    """The batched ``map`` function: a class, so that worker processes get it by pickling."""

    def __init__(self, columns: dict[str, str | None], tokenizer, fmt: RowFormat) -> None:
        self.columns, self.tokenizer, self.fmt = columns, tokenizer, fmt

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        fmt, columns = self.fmt, self.columns
        fields = {k: [None] * len(indices) if c is None else [as_text(v) for v in batch[c]] for k, c in columns.items()}
        rows = [dict(zip(fields, values)) for values in zip(*fields.values())]
        drop = [self._missing(row) for row in rows]
        if fmt.answer_pattern and "answer" in fields:
            for row in rows:
                row["answer"] = final_answer(row["answer"], fmt.answer_pattern)
        student_ids, teacher_ids = [[] for _ in rows], [[] for _ in rows]
        todo = [i for i, d in enumerate(drop) if d == KEPT]
        texts = [prompts.render(fmt.student_template, **_slots(rows[i])) for i in todo]
        for i, ids in zip(todo, self._encode(texts, fmt.chat_template_kwargs)):
            if len(ids) > fmt.max_prompt_length:
                drop[i] = TOO_LONG
            else:
                student_ids[i] = teacher_ids[i] = ids
        todo = [i for i in todo if drop[i] == KEPT]
        if fmt.privileged_template is not None:
            texts = [prompts.render(fmt.privileged_template, **_slots(rows[i])) for i in todo]
            for i, ids in zip(todo, self._encode(texts, fmt.teacher_kwargs)):
                if len(ids) > fmt.max_teacher_prompt_length:  # cut the reference's tail to fit (never the problem)
                    ids = prompts.fit_prompt(
                        fmt.privileged_template,
                        _slots(rows[i]),
                        self.tokenizer,
                        fmt.max_teacher_prompt_length,
                        ("solution",),
                        fmt.use_chat_template,
                        fmt.teacher_kwargs,
                    )
                teacher_ids[i] = ids
        elif fmt.teacher_chat_template_kwargs:
            texts = [prompts.render(fmt.student_template, **_slots(rows[i])) for i in todo]
            for i, ids in zip(todo, self._encode(texts, fmt.teacher_kwargs)):
                teacher_ids[i] = ids
        out = {k: [row[k] for row in rows] for k in fields}
        out.update(index=list(indices), prompt_ids=student_ids, teacher_ids=teacher_ids, drop=drop)
        return out

    def _missing(self, row: dict[str, str | None]) -> int:
        if not (row.get("problem") or "").strip():
            return NO_PROBLEM
        if self.fmt.privileged_template is not None and not (row.get("solution") or "").strip():
            return NO_SOLUTION
        if self.columns.get("answer") is not None and not (row.get("answer") or "").strip():
            return NO_ANSWER
        return KEPT

    def _encode(self, texts: list[str], kwargs: Mapping[str, Any] | None) -> list[list[int]]:
        return encode_user_turns(texts, self.tokenizer, self.fmt.use_chat_template, kwargs)


def _slots(row: dict[str, str | None]) -> dict[str, str]:
    return {k: v or "" for k, v in row.items()}


def _report(reasons: np.ndarray, columns: Mapping[str, str | None], fmt: RowFormat, name: str, key: str) -> None:
    """Say what was dropped and why (once per process for a given preparation); stop when over half was."""
    total, dropped = int(reasons.sum()), int(reasons[1:].sum())
    if not dropped:
        return
    why = {
        NO_PROBLEM: f"with an empty or missing problem (column {columns.get('problem')!r}): check data.problem_column",
        NO_SOLUTION: f"with no reference solution (column {columns.get('solution')!r}), which the privileged teacher "
        "prompt shows: check data.solution_column",
        NO_ANSWER: f"with no answer (column {columns.get('answer')!r}): check data.answer_column, or set it to null "
        "for a dataset without answers",
        TOO_LONG: f"longer than max_prompt_length={fmt.max_prompt_length} tokens: raise data.max_prompt_length",
    }
    parts = "; ".join(f"{int(reasons[code])} {text}" for code, text in why.items() if reasons[code])
    if dropped * 2 > total:
        raise ValueError(f"{name}: {dropped} of {total} rows would be dropped, more than half: {parts}.")
    if key not in _reported:
        _reported.add(key)
        rank_zero_info(f"[trd] {name}: dropped {dropped} of {total} rows: {parts}")


def _fingerprint(dataset: Dataset, columns: Mapping[str, str | None], tokenizer, fmt: RowFormat) -> str:
    """A hash of everything the prepared rows depend on: the dataset's own fingerprint (its files, or the content
    of an in-memory table), the column mapping, the prompt settings, the tokenizer, and this code."""
    return Hasher.hash(
        [
            dataset._fingerprint,
            dict(columns),
            json.dumps(asdict(fmt), sort_keys=True, default=str),
            _tokenizer_identity(tokenizer),
            inspect.getsource(prompts),
            inspect.getsource(sys.modules[check_alignment.__module__]),
            inspect.getsource(sys.modules[__name__]),
        ]
    )


def _tokenizer_identity(tokenizer) -> str:
    """What decides a tokenizer's ids: its vocabulary, merges, normalization, special tokens and chat template.

    The fast tokenizer's serialization is used without its truncation and padding state, which calling the
    tokenizer changes (hashing the object itself would then miss the cache).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return Hasher.hash(tokenizer)
    state = json.loads(backend.to_str())
    state.pop("truncation", None)
    state.pop("padding", None)
    extras = [type(tokenizer).__name__, tokenizer.chat_template, tokenizer.special_tokens_map]
    return Hasher.hash([json.dumps(state, sort_keys=True), json.dumps(extras, sort_keys=True, default=str)])


def check_answer_pattern(pattern: str | None) -> None:
    """Raise a ValueError naming the fix when ``pattern`` (``data.answer_pattern``) is not a regular expression."""
    if pattern is None:
        return
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(
            f"data.answer_pattern={pattern!r} is not a valid regular expression ({err}): fix it, for example "
            r"'(?:####)\s*(.+)' for GSM8K (its first group is the answer), or set it to null."
        ) from err


def as_text(value) -> str | None:
    """A cell as text; a whole-number float (some hubs store answers as float64: 27.0) as an integer ("27")."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def final_answer(answer: str | None, pattern: str) -> str | None:
    """The first group of the last match of ``pattern`` in ``answer`` (the whole answer when nothing matches)."""
    if answer is None:
        return None
    matches = re.findall(pattern, answer)
    if not matches:
        return answer
    last = matches[-1]
    return (last[0] if isinstance(last, tuple) else last).strip()
