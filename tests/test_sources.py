"""Where inputs come from: dataset files and folders, the demo world, demo names and local paths in the model
loaders, and data files that cannot be read, each failing with an error that names the file (and its line) before any
weights load."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from helpers import fit_one_step
from transformers import AutoConfig, AutoModelForCausalLM

from trd_lightning import OnPolicyDataModule
from trd_lightning.data.demo.world import world_dir
from trd_lightning.data.options import ValidationOptions
from trd_lightning.data.sources import load_rows
from trd_lightning.hf import load_causal_lm, load_config, load_tokenizer

# ------------------------------------------------------------------ demo names


def test_loaders_take_demo_names_as_they_are():
    """The loaders resolve trd-demo/... themselves: what they return is what the demo world's folders hold."""
    folder = world_dir()
    config = load_config("trd-demo/teacher")
    assert config.to_dict() == AutoConfig.from_pretrained(folder / "teacher").to_dict()
    assert config.num_hidden_layers == json.loads((folder / "teacher" / "config.json").read_text())["num_hidden_layers"]
    model = load_causal_lm("trd-demo/student")
    reference = AutoModelForCausalLM.from_pretrained(folder / "student")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    tokenizer = load_tokenizer("trd-demo/tokenizer")  # the student's copy
    assert tokenizer.get_vocab() == load_tokenizer(str(folder / "student")).get_vocab()
    assert tokenizer.padding_side == "left"


def test_datamodule_takes_the_demo_tokenizer_name():
    data = OnPolicyDataModule(
        tokenizer="trd-demo/student", train_data="trd-demo", validation=ValidationOptions(split=None)
    )
    data.setup("fit")
    assert len(data.train_rows) == 4096
    assert data.tokenizer.decode(data.train_rows[0]["prompt_ids"]).count(data.train_rows[0]["problem"]) == 1


def test_unknown_demo_part_names_the_choices():
    with pytest.raises(ValueError, match=r"Unknown demo model 'trd-demo/nope'.*trd-demo/student"):
        load_config("trd-demo/nope")


# ------------------------------------------------------------------ missing local paths


@pytest.mark.parametrize("kind", ["absolute", "relative beside an existing folder"])
def test_a_missing_local_model_path_says_so(make_run, tiny, tmp_path, no_weights, kind, monkeypatch):
    if kind == "absolute":
        missing = str(tmp_path / "runs" / "student")
    else:
        (tmp_path / "runs").mkdir()
        monkeypatch.chdir(tmp_path)
        missing = "runs/student"  # a valid hub id too: the existing `runs` folder says it was meant locally
    with pytest.raises(FileNotFoundError, match=rf"Model path '{missing}' does not exist") as err:
        fit_one_step(make_run, model={"student": missing})
    assert "Repo id" not in str(err.value) and "huggingface.co" not in str(err.value)


def test_a_missing_teacher_path_says_so(make_run, tiny, tmp_path, no_weights):
    missing = str(tmp_path / "teacher")
    with pytest.raises(FileNotFoundError, match=rf"Model path '{missing}' does not exist"):
        fit_one_step(make_run, model={"teacher": missing})


def test_a_hub_id_is_left_to_the_hub():
    """A valid hub id with no local folder goes to the hub (offline here): its own error, not ours."""
    with pytest.raises(OSError) as err:
        load_config("trd-lightning-tests/no-such-model")
    assert "Model path" not in str(err.value)


# ------------------------------------------------------------------ malformed files

GOOD = [
    {"problem": f"Last digit, left to right: {i} + 1", "solution": "...", "answer": str((i + 1) % 10)} for i in range(6)
]


def write_jsonl(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_jsonl_with_a_bad_line_names_the_file_and_the_line(make_run, tiny, tmp_path, no_weights):
    lines = [json.dumps(r) for r in GOOD]
    lines[3] = lines[3][:-5]  # cut off the closing quote and brace
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    with pytest.raises(ValueError, match=rf"Dataset file {path} could not be read: line 4, column \d+"):
        fit_one_step(make_run, data={"train_data": path})


def test_jsonl_line_that_is_not_an_object(make_run, tiny, tmp_path, no_weights):
    lines = [json.dumps(r) for r in GOOD]
    lines.insert(2, "[1, 2, 3]")
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    with pytest.raises(ValueError, match=r"line 3 is a JSON list, not an object"):
        fit_one_step(make_run, data={"train_data": path})


def test_broken_json_document_names_its_line(make_run, tiny, tmp_path, no_weights):
    path = tmp_path / "train.json"
    text = json.dumps(GOOD, indent=1)
    path.write_text(text[: len(text) // 2])  # a document cut in the middle
    expected_line = text[: len(text) // 2].count("\n") + 1
    with pytest.raises(ValueError, match=rf"{path} could not be read: line {expected_line}, column \d+"):
        fit_one_step(make_run, data={"train_data": str(path)})


def test_csv_with_a_ragged_row_names_its_line(make_run, tiny, tmp_path, no_weights):
    path = tmp_path / "train.csv"
    records = [["problem", "solution", "answer"]] + [[r["problem"], r["solution"], r["answer"]] for r in GOOD]
    records[5].append("extra")  # line 6 of the file
    with open(path, "w", newline="") as handle:
        csv.writer(handle).writerows(records)
    with pytest.raises(ValueError, match=rf"{path} could not be read: line 6 has 4 fields, the header has 3"):
        fit_one_step(make_run, data={"train_data": str(path)})


def test_file_that_is_not_parquet(make_run, tiny, tmp_path, no_weights):
    path = tmp_path / "train.parquet"
    path.write_bytes(b"this is not a parquet file at all")
    with pytest.raises(ValueError, match=rf"{path} could not be read: not a readable parquet file"):
        fit_one_step(make_run, data={"train_data": str(path)})


def test_good_files_of_each_kind_still_reach_the_weight_loader(make_run, tiny, tmp_path, no_weights):
    """The control: the same rows, well formed, load, so the errors above come from the bad line."""
    from datasets import Dataset

    for suffix in (".jsonl", ".csv", ".parquet"):
        path = tmp_path / f"good{suffix}"
        {".jsonl": Dataset.from_list(GOOD).to_json, ".csv": Dataset.from_list(GOOD).to_csv}.get(
            suffix, Dataset.from_list(GOOD).to_parquet
        )(str(path))
        with pytest.raises(AssertionError, match="weights loaded"):
            fit_one_step(make_run, data={"train_data": str(path), "batch_size": 2}, model={"micro_batch_size": 2})


# ------------------------------------------------------------------ answer pattern


@pytest.mark.parametrize("pattern", ["(unclosed", "####\\s*(?P<x>.+", "[0-9"])
def test_an_invalid_answer_pattern_is_an_error_at_construction(pattern):
    with pytest.raises(ValueError, match=r"data\.answer_pattern=.* is not a valid regular expression.*GSM8K"):
        OnPolicyDataModule(answer_pattern=pattern)


def test_a_valid_answer_pattern_is_accepted():
    assert OnPolicyDataModule(answer_pattern=r"(?:####)\s*(.+)").hparams.answer_pattern == r"(?:####)\s*(.+)"


# ---------------------------------------------------------------- sources

ROWS = [
    {"problem": "Add one and one, please.", "solution": "one, plus one,\nis two", "answer": "two"},
    {"problem": "What is \\frac{1}{2} of x?", "solution": "half of x", "answer": "x/2"},
    {"problem": "Name a prime.", "solution": "Seven is prime.", "answer": "seven"},
]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_load_rows_from_a_local_file(tmp_path, suffix):
    path = tmp_path / f"rows{suffix}"
    dataset = Dataset.from_list(ROWS)
    if suffix == ".parquet":
        dataset.to_parquet(str(path))
    elif suffix == ".csv":
        dataset.to_csv(str(path), index=False)
    else:
        dataset.to_json(str(path))
    loaded = load_rows(str(path), "ignored for one file")
    assert sorted(loaded.column_names) == ["answer", "problem", "solution"]
    assert loaded.to_list() == ROWS


def test_load_rows_from_saved_folders(tmp_path):
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    assert load_rows(str(tmp_path / "one"), "train").to_list() == ROWS
    splits = DatasetDict({"train": Dataset.from_list(ROWS[:2]), "test": Dataset.from_list(ROWS[2:])})
    splits.save_to_disk(str(tmp_path / "dict"))
    assert load_rows(str(tmp_path / "dict"), "test").to_list() == ROWS[2:]
    assert load_rows(str(tmp_path / "dict"), "train").to_list() == ROWS[:2]


def test_load_rows_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"), "train")


def last_digit_answer(problem: str) -> str:
    """The demo task evaluated independently: ops left to right, keeping the last digit."""
    expr = problem.split(": ", 1)[1].split()
    value = int(expr[0])
    for op, digit in zip(expr[1::2], expr[2::2]):
        value = {"+": value + int(digit), "-": value - int(digit), "*": value * int(digit)}[op] % 10
    return str(value)


def test_demo_validation_split():
    data = load_rows("trd-demo", "validation")
    assert len(data) == 128
    assert sorted(data.column_names) == ["answer", "problem", "solution"]
    first = data[0]
    # By hand: 9 + 4 = 13 -> 3, 3 + 7 = 10 -> 0, 0 - 7 = -7 -> 3.
    assert first["problem"] == "Last digit, left to right: 9 + 4 + 7 - 7"
    assert first["answer"] == "3"
    for row in data:
        lines = row["solution"].split("\n")
        assert lines[-1] == f"Answer: \\boxed{{{row['answer']}}}"
        assert lines[-2].endswith(f"= {row['answer']}")  # the last step's value
        assert row["answer"] == last_digit_answer(row["problem"])
