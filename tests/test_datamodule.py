"""OnPolicyDataModule's prompt batches: chat-encoded, left-padded student prompts; privileged teacher prompts within
their budget; problems over the limit dropped, never cut."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import chat_ids

from trd_lightning import prompts
from trd_lightning.data.datamodule import OnPolicyDataModule
from trd_lightning.data.options import PromptOptions, ValidationOptions

NO_VALIDATION = ValidationOptions(split=None)


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def privileged_text(problem: str, solution: str) -> str:
    return prompts.PRIVILEGED_TEMPLATE.replace("{problem}", problem).replace("{solution}", solution)


def student_ids(tok, problem: str) -> list[int]:
    return chat_ids(tok, prompts.STUDENT_TEMPLATE.replace("{problem}", problem))


@pytest.fixture(scope="module")
def opd(tiny):
    dm = OnPolicyDataModule(tokenizer=tiny["student"], train_data=tiny["train"], validation=NO_VALIDATION)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def opsd(tiny):
    dm = OnPolicyDataModule(
        tokenizer=tiny["student"], train_data=tiny["train"], validation=NO_VALIDATION, teacher_context="privileged"
    )
    dm.setup("fit")
    return dm


def pick_rows_of_different_lengths(tok, file_rows: list[dict], n: int = 3) -> list[int]:
    """Row indices whose student prompts have pairwise different lengths, so the padding is exercised."""
    chosen, lengths = [], set()
    for i, row in enumerate(file_rows):
        length = len(student_ids(tok, row["problem"]))
        if length not in lengths:
            chosen.append(i)
            lengths.add(length)
        if len(chosen) == n:
            return chosen
    raise AssertionError("the train file has too few distinct prompt lengths")


def test_collate_left_pads_the_chat_encoded_student_prompts(tiny, tok, opd):
    file_rows = read_jsonl(tiny["train"])
    assert len(opd.train_rows) == len(file_rows)  # the default limits drop nothing here
    picked = pick_rows_of_different_lengths(tok, file_rows)
    batch = opd.collate([opd.train_rows[i] for i in picked])

    expected = [student_ids(tok, file_rows[i]["problem"]) for i in picked]
    width = max(map(len, expected))
    pad = tok.pad_token_id
    assert batch.prompts.ids.tolist() == [[pad] * (width - len(e)) + e for e in expected]
    assert batch.prompts.mask.tolist() == [[0] * (width - len(e)) + [1] * len(e) for e in expected]
    assert batch.index.tolist() == picked
    assert batch.problem == [file_rows[i]["problem"] for i in picked]
    assert batch.solution == [file_rows[i]["solution"] for i in picked]
    assert batch.answer == [file_rows[i]["answer"] for i in picked]
    # OPD: the teacher sees exactly what the student sees.
    assert torch.equal(batch.contexts.ids, batch.prompts.ids)
    assert torch.equal(batch.contexts.mask, batch.prompts.mask)
    assert batch.y_o is None and batch.produced is None


def test_collate_privileged_teacher_prompt_holds_the_solution(tiny, tok, opsd):
    file_rows = read_jsonl(tiny["train"])
    picked = [0, 1, 2]
    batch = opsd.collate([opsd.train_rows[i] for i in picked])
    for k, i in enumerate(picked):
        real = batch.contexts.lists()[k]
        # Short demo solutions fit the default 1024-token budget, so the teacher prompt is the full render.
        assert real == chat_ids(tok, privileged_text(file_rows[i]["problem"], file_rows[i]["solution"]))
        text = tok.decode(real)
        assert file_rows[i]["solution"] in text and file_rows[i]["problem"] in text
        # The student side stays the plain student prompt.
        student = batch.prompts.lists()[k]
        assert student == student_ids(tok, file_rows[i]["problem"])
        assert file_rows[i]["solution"] not in tok.decode(student)
    assert batch.answer == [file_rows[i]["answer"] for i in picked]


def test_privileged_teacher_prompt_is_cut_to_its_budget(tiny, tok):
    budget = 60
    dm = OnPolicyDataModule(
        tokenizer=tiny["student"],
        train_data=tiny["train"],
        validation=NO_VALIDATION,
        teacher_context="privileged",
        prompt=PromptOptions(privileged_template="{problem}\nReference:\n{solution}", max_teacher_prompt_length=budget),
    )
    dm.setup("fit")
    full = [len(chat_ids(tok, f"{r['problem']}\nReference:\n{r['solution']}")) for r in read_jsonl(tiny["train"])]
    assert max(full) > budget  # some rows must need the cut
    for row, length in zip(dm.train_rows, full):
        assert len(row["teacher_ids"]) <= budget
        assert (prompts.TRUNCATION_MARKER in tok.decode(row["teacher_ids"])) == (length > budget)
        assert row["problem"] in tok.decode(row["teacher_ids"])
    assert dm.longest_prompt == max(max(len(r["prompt_ids"]), len(r["teacher_ids"])) for r in dm.train_rows)


def test_prompts_over_max_prompt_length_are_dropped_not_cut(tiny, tok):
    file_rows = read_jsonl(tiny["train"])
    lengths = [len(student_ids(tok, r["problem"])) for r in file_rows]
    limit = sorted(lengths)[len(lengths) // 2]
    assert min(lengths) <= limit < max(lengths)
    dm = OnPolicyDataModule(
        tokenizer=tiny["student"],
        train_data=tiny["train"],
        validation=NO_VALIDATION,
        prompt=PromptOptions(max_prompt_length=limit),
    )
    dm.setup("fit")
    assert [r["index"] for r in dm.train_rows] == [i for i, n in enumerate(lengths) if n <= limit]
    assert dm.longest_prompt == max(n for n in lengths if n <= limit)
