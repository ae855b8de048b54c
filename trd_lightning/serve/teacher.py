"""The served teacher: top-k log-probs of the teacher at every response position, from ``prompt_logprobs``.

Full-vocabulary scores cannot travel (tens of GB a step at paper scale); top-k ones can, and they feed ``loss: topk``
(teacher support, with or without the tail bucket) and ``loss: sampled_token`` (the response token's own log-prob is
always in vLLM's ``prompt_logprobs``). The teacher sees its context followed by the response, as in-process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from trd_lightning.rollout.batch import Sequences
from trd_lightning.serve.client import ServiceClient, prompt_scores
from trd_lightning.serve.options import ServiceError, ServiceOptions


@dataclass
class TeacherScores:
    """The teacher's scores of a batch, aligned with its ``response_ids`` / ``response_mask`` [B, L].

    Attributes:
        ids: [B, L, k] the teacher's top-k token ids at each response position (by rank; 0 off the mask).
        logprobs: [B, L, k] their log-probs (normalised over the whole vocabulary, untempered).
        token_logprobs: [B, L] the teacher's log-prob of the response token itself.
    """

    ids: Tensor
    logprobs: Tensor
    token_logprobs: Tensor

    def rows(self, index, width: int) -> TeacherScores:
        """The rows ``index`` and the first ``width`` response columns: the slice ``Sequences.rows`` keeps."""
        return TeacherScores(
            self.ids[index][:, :width], self.logprobs[index][:, :width], self.token_logprobs[index][:, :width]
        )

    def flat(self, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per response token (in ``mask`` order): [N, k] ids, [N, k] log-probs, [N] the token's log-prob."""
        mask = mask.bool()
        return self.ids[mask], self.logprobs[mask], self.token_logprobs[mask]


class ServedTeacher:
    """Teacher scores from the service at ``url``: one request per row, concurrently.

    Args:
        url: the service's address.
        options: timeout, retries, backoff and concurrency.
        k: top-k log-probs per position (``model.loss_top_k``; 1 is enough for ``sampled_token``).
        vocab_size: the student's vocabulary.
    """

    def __init__(self, url: str, options: ServiceOptions, k: int, vocab_size: int) -> None:
        self.client = ServiceClient(url, options, "model.teacher_url")
        self.k, self.vocab_size = k, vocab_size

    def check(self, tokenizer, needed: int | None = None) -> None:
        """The start checks (``needed``: the longest teacher row plus the one token generated alongside), with a
        probe that asks ``prompt_logprobs: k`` (the server must allow that many)."""
        prompt, reply = self.client.check(tokenizer, self.vocab_size, self._body([[0]]), needed)
        if not isinstance(reply["choices"][0].get("prompt_logprobs"), list):
            raise ServiceError(
                self.client.url,
                f"The service at {self.client.url} (model.teacher_url) returns no prompt_logprobs, so it cannot score "
                "as a teacher (SGLang's completions route has none): serve the teacher with vLLM or trd serve; such a "
                "server can still serve the refiner (data.refine.url).",
            )
        prompt_scores(self.client, reply["choices"][0], prompt, 1, self.k, self.vocab_size)

    def scores(self, seqs: Sequences) -> TeacherScores:
        """The scores of every response position of ``seqs`` (the whole step's rows, fetched concurrently)."""
        mask = seqs.response_mask.bool()
        rows = [ids[m.bool()].tolist() for ids, m in zip(seqs.teacher_ids, seqs.teacher_mask)]
        tails = mask.sum(-1).tolist()
        todo = [i for i in range(len(rows)) if tails[i]]
        if any(len(rows[i]) <= tails[i] for i in todo):
            raise ValueError("A teacher row has no context before its response: nothing predicts its first token.")
        size = self.client.options.rows_per_request
        groups = [todo[s : s + size] for s in range(0, len(todo), size)]

        def score(group: list[int]) -> list:
            choices = self.client.complete(self._body([rows[i] for i in group]))["choices"]
            return [
                prompt_scores(self.client, c, rows[i], tails[i], self.k, self.vocab_size)
                for i, c in zip(group, choices)
            ]

        shape = (*mask.shape, self.k)
        ids = torch.zeros(shape, dtype=torch.long)
        logprobs = torch.zeros(shape, dtype=torch.float32)
        own = torch.zeros(mask.shape, dtype=torch.float32)
        for group, results in zip(groups, self.client.map(score, groups)):
            for i, (top_ids, top_lp, token_lp) in zip(group, results):
                ids[i, : tails[i]] = torch.tensor(top_ids)
                logprobs[i, : tails[i]] = torch.tensor(top_lp)
                own[i, : tails[i]] = torch.tensor(token_lp)
        device = mask.device
        return TeacherScores(ids.to(device), logprobs.to(device), own.to(device))

    def _body(self, prompt: list[list[int]]) -> dict:
        # One greedy token is generated alongside (vLLM generates at least one); only the prompt's scores are read.
        return {"prompt": prompt, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": self.k}


def connect_teacher(hp, options: ServiceOptions, vocab_size: int, needed: int | None = None) -> ServedTeacher:
    """The served teacher of a module with hyperparameters ``hp``, checked against its student (and ``needed``, the
    longest teacher row plus one) before any weights load; ``sampled_token`` needs only the token's own log-prob, so
    it asks for one top entry."""
    from trd_lightning.hf import load_tokenizer

    k = hp.loss_top_k if hp.loss == "topk" else 1
    teacher = ServedTeacher(hp.teacher_url, options, k, vocab_size)
    teacher.check(load_tokenizer(hp.student, hp.trust_remote_code), needed)
    return teacher
