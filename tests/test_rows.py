"""Rows to prompts: bad rows dropped and counted, separate chat-template arguments for the teacher, the check that
student and teacher prompts line up, and preparation through a cached ``datasets.map``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from datasets import Dataset
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from trd_lightning import OnPolicyDataModule, prompts
from trd_lightning.data import rows as rows_module
from trd_lightning.data.demo.tokenizer import build_tokenizer
from trd_lightning.data.options import PromptOptions, ValidationOptions
from trd_lightning.data.rows import RowFormat, prepare_rows
from trd_lightning.hf import load_tokenizer

THINKING_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def row(i: int, **changes) -> dict:
    return {
        "problem": f"Last digit, left to right: {i % 10} + 3",
        "solution": f"{i % 10} + 3 = {(i + 3) % 10}",
        "answer": str((i + 3) % 10),
        **changes,
    }


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


NO_VALIDATION = ValidationOptions(split=None)
PLAIN = PromptOptions(use_chat_template=False, student_template="{problem}")


def datamodule(tiny, train: str, **kw) -> OnPolicyDataModule:
    data = OnPolicyDataModule(tokenizer=tiny["student"], train_data=train, validation=NO_VALIDATION, **kw)
    data.setup("fit")
    return data


def chat_ids(tok, text: str, **kwargs) -> list[int]:
    """The reference encoding of one user turn, straight from the tokenizer."""
    out = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, **kwargs)
    return list(out["input_ids"])


# ------------------------------------------------------------------ bad rows

BAD = {1: {"problem": None}, 4: {"problem": "   "}, 6: {"solution": None}, 7: {"answer": None}, 9: {"solution": ""}}


@pytest.fixture
def mixed(tmp_path) -> str:
    """Twelve rows: two without a problem, two without a reference solution, one without an answer."""
    return write_jsonl(tmp_path / "mixed.jsonl", [row(i, **BAD.get(i, {})) for i in range(12)])


@pytest.fixture
def info_log(caplog):
    """Lightning's messages (``rank_zero_info``) go to its own logger, which does not propagate to the root."""
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    yield caplog
    logger.removeHandler(caplog.handler)


def test_opsd_drops_rows_without_problem_reference_or_answer(tiny, mixed, info_log):
    data = datamodule(tiny, mixed, teacher_context="privileged")
    assert [r["index"] for r in data.train_rows] == [0, 2, 3, 5, 8, 10, 11]
    message = info_log.text
    assert "dropped 5 of 12 rows" in message
    assert "2 with an empty or missing problem (column 'problem')" in message
    assert "2 with no reference solution (column 'solution')" in message
    assert "1 with no answer (column 'answer')" in message


def test_opd_keeps_rows_without_a_reference(tiny, mixed, info_log):
    """OPD's teacher sees the student prompt: a missing reference is no reason to drop a row."""
    data = datamodule(tiny, mixed)
    assert [r["index"] for r in data.train_rows] == [0, 2, 3, 5, 6, 8, 9, 10, 11]
    assert "dropped 3 of 12 rows" in info_log.text and "reference" not in info_log.text


def test_rows_without_answers_are_kept_when_answers_are_not_used(tiny, mixed):
    data = datamodule(tiny, mixed, answer_column=None)
    assert [r["index"] for r in data.train_rows] == [0, 2, 3, 5, 6, 7, 8, 9, 10, 11]
    assert all(r["answer"] is None for r in data.train_rows)


def test_more_than_half_dropped_stops_the_run(tiny, tmp_path):
    records = [
        row(i, problem=None if i < 4 else row(i)["problem"], answer=None if i == 4 else str(i)) for i in range(9)
    ]
    path = write_jsonl(tmp_path / "mostly_bad.jsonl", records)
    with pytest.raises(
        ValueError,
        match=r"5 of 9 rows would be dropped, more than half: 4 with an empty or missing "
        r"problem .*check data\.problem_column; 1 with no answer",
    ):
        datamodule(tiny, path)


def test_exactly_half_dropped_is_allowed(tiny, tmp_path):
    records = [row(i, problem=None if i < 4 else row(i)["problem"]) for i in range(8)]
    data = datamodule(tiny, write_jsonl(tmp_path / "half.jsonl", records))
    assert [r["index"] for r in data.train_rows] == [4, 5, 6, 7]


def test_validation_split_drops_bad_rows_too(tiny, mixed, info_log):
    validation = ValidationOptions(data=mixed, split="x")
    data = OnPolicyDataModule(tokenizer=tiny["student"], train_data=tiny["train"], validation=validation)
    data.setup("validate")
    # Validation prompts the student alone: the reference is not needed there.
    assert [r["index"] for r in data.val_rows] == [0, 2, 3, 5, 6, 8, 9, 10, 11]


# ------------------------------------------------------------------ chat-template arguments


@pytest.fixture(scope="module")
def thinking(tiny, tmp_path_factory) -> str:
    """The tiny tokenizer with a chat template that takes ``enable_thinking``, as Qwen3's does."""
    tok = load_tokenizer(tiny["student"])
    tok.chat_template = THINKING_TEMPLATE
    folder = tmp_path_factory.mktemp("thinking")
    tok.save_pretrained(folder)
    return str(folder)


def test_teacher_arguments_override_the_student_ones(tiny, thinking, mixed):
    data = OnPolicyDataModule(
        tokenizer=thinking,
        train_data=mixed,
        validation=NO_VALIDATION,
        teacher_context="privileged",
        prompt=PromptOptions(
            chat_template_kwargs={"enable_thinking": False}, teacher_chat_template_kwargs={"enable_thinking": True}
        ),
    )
    data.setup("fit")
    tok = load_tokenizer(thinking)
    first = data.train_rows[0]
    student_text = prompts.STUDENT_TEMPLATE.replace("{problem}", first["problem"])
    teacher_text = prompts.render(prompts.PRIVILEGED_TEMPLATE, problem=first["problem"], solution=first["solution"])
    assert first["prompt_ids"] == chat_ids(tok, student_text, enable_thinking=False)
    assert first["teacher_ids"] == chat_ids(tok, teacher_text, enable_thinking=True)
    assert tok.decode(first["prompt_ids"]).endswith("assistant\n<think>\n\n</think>\n\n")
    assert tok.decode(first["teacher_ids"]).endswith("assistant\n")


def test_opd_teacher_arguments_give_the_teacher_its_own_prompt(tiny, thinking, mixed):
    data = OnPolicyDataModule(
        tokenizer=thinking,
        train_data=mixed,
        validation=NO_VALIDATION,
        prompt=PromptOptions(
            chat_template_kwargs={"enable_thinking": False}, teacher_chat_template_kwargs={"enable_thinking": True}
        ),
    )
    data.setup("fit")
    tok = load_tokenizer(thinking)
    for r in data.train_rows:
        text = prompts.STUDENT_TEMPLATE.replace("{problem}", r["problem"])
        assert r["prompt_ids"] == chat_ids(tok, text, enable_thinking=False)
        assert r["teacher_ids"] == chat_ids(tok, text, enable_thinking=True)


def test_without_teacher_arguments_both_sides_share_the_student_ones(tiny, thinking, mixed):
    data = OnPolicyDataModule(
        tokenizer=thinking,
        train_data=mixed,
        validation=NO_VALIDATION,
        prompt=PromptOptions(chat_template_kwargs={"enable_thinking": False}),
    )
    data.setup("fit")
    assert all(r["teacher_ids"] == r["prompt_ids"] for r in data.train_rows)
    assert load_tokenizer(thinking).decode(data.train_rows[0]["teacher_ids"]).endswith("</think>\n\n")


# ------------------------------------------------------------------ alignment check


def plain_tokenizer(folder: Path, template: str) -> str:
    """The demo tokenizer with a BOS token that a post-processor adds (``template``: e.g. ``<s> $A``)."""
    backend = build_tokenizer().backend_tokenizer
    backend.add_special_tokens(["<s>"])
    specials = [("<s>", backend.token_to_id("<s>")), ("<|im_end|>", backend.token_to_id("<|im_end|>"))]
    backend.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.save_pretrained(folder)
    return str(folder)


def test_a_doubled_bos_is_an_error_naming_the_template(tiny, tmp_path, mixed):
    tokenizer = plain_tokenizer(tmp_path / "bos", "<s> $A")
    with pytest.raises(
        ValueError,
        match=r"student prompt starts with two BOS tokens.*Remove '<s>' from "
        r"data\.student_template",
    ):
        OnPolicyDataModule(
            tokenizer=tokenizer,
            train_data=mixed,
            validation=NO_VALIDATION,
            prompt=PromptOptions(use_chat_template=False, student_template="<s>{problem}"),
        ).setup("fit")


def test_a_single_bos_lines_up(tiny, tmp_path, mixed):
    """The control: the same tokenizer with a template that leaves the BOS to it."""
    tokenizer = plain_tokenizer(tmp_path / "bos", "<s> $A")
    data = OnPolicyDataModule(tokenizer=tokenizer, train_data=mixed, validation=NO_VALIDATION, prompt=PLAIN)
    data.setup("fit")
    bos = data.tokenizer.bos_token_id
    assert all(r["prompt_ids"][0] == bos and r["prompt_ids"][1] != bos for r in data.train_rows)


def test_a_privileged_prompt_with_its_own_bos_is_an_error(tiny, tmp_path, mixed):
    tokenizer = plain_tokenizer(tmp_path / "bos", "<s> $A")
    with pytest.raises(ValueError, match=r"teacher prompt starts with two BOS.*data\.privileged_template"):
        OnPolicyDataModule(
            tokenizer=tokenizer,
            train_data=mixed,
            validation=NO_VALIDATION,
            teacher_context="privileged",
            prompt=PromptOptions(
                use_chat_template=False, student_template="{problem}", privileged_template="<s>{problem}\n{solution}"
            ),
        ).setup("fit")


def test_a_prompt_that_ends_with_eos_is_an_error(tiny, tmp_path, mixed):
    tokenizer = plain_tokenizer(tmp_path / "eos", "$A <|im_end|>")
    with pytest.raises(ValueError, match=r"student prompt ends with the end-of-sequence token '<\|im_end\|>'"):
        OnPolicyDataModule(tokenizer=tokenizer, train_data=mixed, validation=NO_VALIDATION, prompt=PLAIN).setup("fit")


# ------------------------------------------------------------------ preparation and its cache


def reference_rows(dataset: Dataset, tok, fmt: RowFormat) -> list[dict]:
    """Today's per-row path, one tokenizer call per prompt: the independent reference for the batched map."""
    out = []
    for i, example in enumerate(dataset):
        ids = prompts.to_prompt_ids(prompts.render(fmt.student_template, problem=example["problem"]), tok, True)
        if len(ids) > fmt.max_prompt_length:
            continue
        teacher = prompts.fit_prompt(
            fmt.privileged_template, example, tok, fmt.max_teacher_prompt_length, ("solution",)
        )
        out.append({**example, "index": i, "prompt_ids": ids, "teacher_ids": teacher})
    return out


@pytest.fixture
def fmt() -> RowFormat:
    # A teacher budget that cuts some references, and a student limit that drops some rows.
    return RowFormat("{problem}", "{problem}\nReference:\n{solution}", 28, 40)


@pytest.fixture
def dataset() -> Dataset:
    solutions = [" then ".join(f"step {k}" for k in range(i % 7)) or "none" for i in range(40)]
    return Dataset.from_list(
        [row(i * 37, solution=s) for i, s in enumerate(solutions)] + [row(1, problem="A much longer problem, " * 6)]
    )


def test_map_gives_the_per_row_reference(tiny, dataset, fmt, tmp_path):
    tok = load_tokenizer(tiny["student"])
    expected = reference_rows(dataset, tok, fmt)
    assert len(expected) == 40 and any(prompts.TRUNCATION_MARKER in tok.decode(r["teacher_ids"]) for r in expected)
    for workers in (None, 2):
        prepared = prepare_rows(
            dataset,
            {"problem": "problem", "solution": "solution", "answer": "answer"},
            tok,
            fmt,
            "test",
            cache_dir=str(tmp_path / f"cache{workers}"),
            num_proc=workers,
        )
        assert prepared.to_list() == expected


def test_the_second_preparation_reads_the_cache(tiny, dataset, fmt, tmp_path, monkeypatch):
    tok = load_tokenizer(tiny["student"])
    columns = {"problem": "problem", "solution": "solution", "answer": "answer"}
    first = prepare_rows(dataset, columns, tok, fmt, "test", cache_dir=str(tmp_path))
    assert [Path(f["filename"]).parent for f in first.cache_files] == [tmp_path]

    def refuse(self, batch, indices):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(rows_module._Tokenize, "__call__", refuse)
    # A fresh tokenizer object and a new in-memory copy of the rows: another process, or another rank.
    again = prepare_rows(
        Dataset.from_list(dataset.to_list()),
        columns,
        load_tokenizer(tiny["student"]),
        fmt,
        "test",
        cache_dir=str(tmp_path),
    )
    assert again.to_list() == first.to_list()
    # Anything that shapes the ids is part of the key: a new budget tokenizes again.
    changed = RowFormat(fmt.student_template, fmt.privileged_template, fmt.max_prompt_length, 60)
    with pytest.raises(AssertionError, match="tokenized again"):
        prepare_rows(dataset, columns, tok, changed, "test", cache_dir=str(tmp_path))


def test_the_datamodule_reads_its_own_cache_on_a_restart(tiny, mixed, monkeypatch):
    first = datamodule(tiny, mixed, teacher_context="privileged").train_rows

    def refuse(self, batch, indices):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(rows_module._Tokenize, "__call__", refuse)
    assert datamodule(tiny, mixed, teacher_context="privileged").train_rows.to_list() == first.to_list()
