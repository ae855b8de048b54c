"""The data side against hand-built expectations: templates, prompt fitting, padding and the batch layout, the
resumable sampler, the datamodule's prompt batches, dataset loading and answer checking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict

from trd_lightning import prompts
from trd_lightning.data.datamodule import OnPolicyDataModule
from trd_lightning.data.options import PromptOptions, ValidationOptions
from trd_lightning.data.sampler import ResumableSampler
from trd_lightning.data.sources import load_rows
from trd_lightning.hf import load_tokenizer
from trd_lightning.rollout.batch import Prompts, Rollouts, Sequences, response_rows
from trd_lightning.verify import is_correct

NO_VALIDATION = ValidationOptions(split=None)

PRIVILEGED_HEAD = "Here is a reference solution to this problem:\n"
PRIVILEGED_TAIL = "\n\nNow that you have read the reference solution"


@pytest.fixture(scope="module")
def tok(tiny):
    return load_tokenizer(tiny["student"])


def chat_ids(tok, text: str) -> list[int]:
    """A user turn through the chat template, encoded by the tokenizer directly (not through prompts.py)."""
    messages = [{"role": "user", "content": text}]
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- templates


def test_render_fills_named_slots_and_keeps_other_braces():
    template = "P={problem} S={solution} I={initial} keep {other} and \\boxed{} and {{x}}"
    out = prompts.render(template, problem="1+1", solution="two", initial="2")
    assert out == "P=1+1 S=two I=2 keep {other} and \\boxed{} and {{x}}"


def test_render_default_student_template():
    assert prompts.render(prompts.STUDENT_TEMPLATE, problem="What is 2+3?") == (
        "What is 2+3?\nPlease reason step by step, and put your final answer within \\boxed{}."
    )


def test_render_inserts_field_text_literally():
    # A problem may itself contain a slot name or a regex escape: it is data, never re-substituted.
    out = prompts.render("{problem}|{solution}", problem="see {solution} and \\1 \\g<0>", solution="S")
    assert out == "see {solution} and \\1 \\g<0>|S"


def test_check_template_names_the_missing_slots():
    with pytest.raises(ValueError, match=r"The privileged template must contain \{solution\}"):
        prompts.check_template("{problem} only", {"problem", "solution"}, "privileged")
    with pytest.raises(ValueError, match=r"must contain \{problem\}, \{solution\}"):
        prompts.check_template("no slots, just \\boxed{}", {"problem", "solution"}, "privileged")
    prompts.check_template(prompts.PRIVILEGED_TEMPLATE, {"problem", "solution"}, "privileged")


# ---------------------------------------------------------------- fit_prompt

PROBLEM = "Last digit, left to right: 6 + 4 * 7 - 4 - 5"
SOLUTION = "6 + 4 = 0\n0 * 7 = 0\n0 - 4 = 6\n6 - 5 = 1\nAnswer: \\boxed{1}"


def privileged_text(problem: str, solution: str) -> str:
    return prompts.PRIVILEGED_TEMPLATE.replace("{problem}", problem).replace("{solution}", solution)


def fit_privileged(tok, problem: str, solution: str, budget: int) -> list[int]:
    fields = {"problem": problem, "solution": solution}
    return prompts.fit_prompt(prompts.PRIVILEGED_TEMPLATE, fields, tok, budget, ("solution",))


def test_fit_prompt_cuts_the_tail_of_a_long_solution(tok):
    long_solution = "\n".join(f"step {i}: {SOLUTION}" for i in range(20))
    budget = 120
    assert len(chat_ids(tok, privileged_text(PROBLEM, long_solution))) > 3 * budget  # so a cut is needed

    ids = fit_privileged(tok, PROBLEM, long_solution, budget)
    assert len(ids) <= budget
    text = tok.decode(ids)
    assert PROBLEM in text
    assert text.count(prompts.TRUNCATION_MARKER) == 1
    kept = text.split(PRIVILEGED_HEAD, 1)[1].split(prompts.TRUNCATION_MARKER, 1)[0]
    # The head of the solution survives and its tail is gone.
    assert kept and long_solution.startswith(kept) and len(kept) < len(long_solution)
    assert kept.startswith("step 0: 6 + 4 = 0")
    assert "step 19" not in text
    # The instructions after the solution are never cut.
    assert text.split(prompts.TRUNCATION_MARKER, 1)[1].startswith(PRIVILEGED_TAIL)
    assert text.endswith("within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")


def test_fit_prompt_that_fits_is_the_plain_encoding(tok):
    expected = chat_ids(tok, privileged_text(PROBLEM, SOLUTION))
    for budget in (1024, len(expected)):  # well within, and exactly at the budget
        ids = fit_privileged(tok, PROBLEM, SOLUTION, budget)
        assert ids == expected
        assert prompts.TRUNCATION_MARKER not in tok.decode(ids)


def test_fit_prompt_one_token_short_cuts_the_solution(tok):
    expected = chat_ids(tok, privileged_text(PROBLEM, SOLUTION))
    ids = fit_privileged(tok, PROBLEM, SOLUTION, len(expected) - 1)
    assert len(ids) <= len(expected) - 1
    assert prompts.TRUNCATION_MARKER in tok.decode(ids)


def test_fit_prompt_never_cuts_the_problem(tok):
    long_problem = " ".join([PROBLEM] * 30)
    with pytest.raises(ValueError, match="the problem and the instructions are never cut"):
        fit_privileged(tok, long_problem, SOLUTION, 120)


def test_fit_prompt_floor_is_the_template_with_the_marker(tok):
    # The smallest prompt fit_prompt can make is the template with the marker as the whole solution: one
    # token below it is an error, at it a prompt comes back.
    floor = len(chat_ids(tok, privileged_text(PROBLEM, prompts.TRUNCATION_MARKER)))
    long_solution = SOLUTION * 10
    with pytest.raises(ValueError, match="never cut"):
        fit_privileged(tok, PROBLEM, long_solution, floor - 1)
    ids = fit_privileged(tok, PROBLEM, long_solution, floor)
    assert len(ids) <= floor
    assert PROBLEM in tok.decode(ids)


# ---------------------------------------------------------------- batch layout


def test_prompts_are_left_padded():
    prompts = Prompts.from_lists([[5, 6, 7], [8]], 0)
    assert prompts.ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert prompts.mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert prompts.ids.dtype == torch.long
    assert prompts.lists() == [[5, 6, 7], [8]]


def test_prompts_with_an_empty_row_and_a_nonzero_pad():
    prompts = Prompts.from_lists([[], [3, 4]], 9)
    assert prompts.ids.tolist() == [[9, 9], [3, 4]]
    assert prompts.mask.tolist() == [[0, 0], [1, 1]]


def test_selected_prompt_rows_lose_the_padding_they_no_longer_need():
    prompts = Prompts.from_lists([[5, 6, 7], [8], [1, 2]], 0)
    picked = prompts.rows([1, 2])
    assert picked.ids.tolist() == [[0, 8], [1, 2]] and picked.mask.tolist() == [[0, 1], [1, 1]]


def sequences() -> Sequences:
    prompts = Prompts.from_lists([[5, 6, 7], [8]], 0)
    contexts = Prompts.from_lists([[4, 5, 6, 7], [3, 8]], 0)
    response = Rollouts(
        ids=torch.tensor([[9, 2, 0], [10, 11, 2]]),
        mask=torch.tensor([[True, True, False], [True, True, True]]),
        truncated=torch.tensor([False, False]),
        logprobs=torch.tensor([[-1.0, -2.0, 0.0], [-3.0, -4.0, -5.0]]),
    )
    return Sequences.build(prompts, contexts, response, torch.tensor([True, False]))


def test_sequences_join_prompt_and_response_on_both_sides():
    seqs = sequences()
    assert seqs.student_ids.tolist() == [[5, 6, 7, 9, 2, 0], [0, 0, 8, 10, 11, 2]]
    assert seqs.student_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert seqs.teacher_ids.tolist() == [[4, 5, 6, 7, 9, 2, 0], [0, 0, 3, 8, 10, 11, 2]]
    assert (seqs.prompt_width, seqs.context_width) == (3, 4)


def test_sequence_rows_trim_the_padding_of_the_rows_they_keep():
    row = sequences().rows([0])
    # Row 0's response has 2 tokens and its prompt no padding: one response column and no prompt column go.
    assert row.student_ids.tolist() == [[5, 6, 7, 9, 2]] and row.teacher_ids.tolist() == [[4, 5, 6, 7, 9, 2]]
    assert row.response_mask.tolist() == [[True, True]] and row.behavior_logprobs.tolist() == [[-1.0, -2.0]]
    other = sequences().rows([1])
    assert other.student_ids.tolist() == [[8, 10, 11, 2]] and other.teacher_ids.tolist() == [[3, 8, 10, 11, 2]]
    assert other.sampled.tolist() == [False]


def test_behaviour_logprobs_where_sampled_and_the_students_own_elsewhere():
    seqs = sequences()
    student = torch.tensor([-0.5, -0.6, -0.7, -0.8, -0.9])  # one per response token, row 0 then row 1
    assert seqs.token_behavior_logprobs(student).tolist() == pytest.approx([-1.0, -2.0, -0.7, -0.8, -0.9])


def test_response_rows_picks_the_predicting_positions():
    batch, prompt_width, length = 2, 3, 3
    # hidden[b, c] = (b, c): each picked row tells where it came from.
    b = torch.arange(batch).view(-1, 1).expand(batch, prompt_width + length)
    c = torch.arange(prompt_width + length).view(1, -1).expand(batch, prompt_width + length)
    hidden = torch.stack([b, c], -1).float()
    response_mask = torch.tensor([[True, True, False], [True, True, True]])
    rows = response_rows(hidden, prompt_width, response_mask)
    # Response token j is predicted by column prompt_width - 1 + j = 2 + j; row 0's third token is pad.
    assert rows.tolist() == [[0, 2], [0, 3], [1, 2], [1, 3], [1, 4]]


def test_response_rows_skips_holes_in_the_mask():
    hidden = torch.arange(7).float().view(1, 7, 1)  # one row, 4 prompt columns + 3 response columns
    rows = response_rows(hidden, 4, torch.tensor([[True, False, True]]))
    assert rows.flatten().tolist() == [3, 5]


# ---------------------------------------------------------------- resumable sampler


def shuffled(n: int, seed: int) -> list[int]:
    """DistributedSampler's epoch-0 order: a permutation from a generator seeded with seed + epoch."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def test_resumable_sampler_skips_once():
    data = list(range(10))
    full = shuffled(10, seed=3)
    assert full != data  # a shuffle that happens to be the identity would hide an ignored order
    sampler = ResumableSampler(data, num_replicas=1, rank=0, shuffle=True, seed=3)
    sampler.skip = 4
    assert list(sampler) == full[4:]
    assert list(sampler) == full  # the skip applies to the resumed epoch only


def test_resumable_sampler_without_skip_is_the_full_order():
    sampler = ResumableSampler(list(range(10)), num_replicas=1, rank=0, shuffle=True, seed=3)
    assert list(sampler) == shuffled(10, seed=3)


def test_resumable_sampler_replicas_partition_the_dataset():
    data = list(range(10))
    parts = [list(ResumableSampler(data, num_replicas=2, rank=r, shuffle=True, seed=5)) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == 5
    assert set(parts[0]).isdisjoint(parts[1])
    assert sorted(parts[0] + parts[1]) == data


def test_resumable_sampler_skip_is_per_replica():
    data = list(range(10))
    whole = list(ResumableSampler(data, num_replicas=2, rank=1, shuffle=True, seed=5))
    sampler = ResumableSampler(data, num_replicas=2, rank=1, shuffle=True, seed=5)
    sampler.skip = 2
    assert list(sampler) == whole[2:]


# ---------------------------------------------------------------- datamodule


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


# ---------------------------------------------------------------- answer checking


@pytest.mark.parametrize(
    ("response", "gold", "expected"),
    [
        ("The answer is \\boxed{3}.", "3", True),
        ("\\boxed{3}", "4", False),
        ("0.5", "1/2", True),
        ("\\frac{1}{2}", "0.5", True),
        ("So we get \\boxed{\\frac{1}{2}}", "0.5", True),
        ("I could not work it out.", "3", False),
        ("", "3", False),
    ],
)
def test_is_correct(response, gold, expected):
    assert is_correct(response, gold) is expected
