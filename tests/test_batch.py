"""The typed batch layout (``trd_lightning.rollout.batch``): left-padded prompts, right-padded responses, sequences
with identical response ids on both sides, trimmed row selections and the positions that predict the response."""

from __future__ import annotations

import pytest
import torch

from trd_lightning.rollout.batch import Prompts, Rollouts, Sequences, response_rows


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
