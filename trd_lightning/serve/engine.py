"""The server's batching worker: concurrent requests are gathered for a few milliseconds and run together.

Generation goes through ``LocalEngine.generate`` with one seed per row, so a row's tokens depend only on its prompt
and seed, never on the requests it was batched with: the same model and seed give the same tokens as in-process
generation. Scoring (``prompt_logprobs``) is one forward over the batch's prompts; a scoring request with
``max_tokens: 1`` draws its one token from that forward's last position (the draw ``generate`` would make).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from trd_lightning.hf import last_hidden, output_head
from trd_lightning.rollout.batch import Prompts, response_rows
from trd_lightning.rollout.engines import LocalEngine
from trd_lightning.rollout.sampling import SamplingConfig, cut_at_eos, draw, filtered_logprobs
from trd_lightning.rollout.seeds import uniforms


@dataclass
class Job:
    """One request's rows: row r is ``prompts[r]`` sampled with ``seeds[r]`` (prompts repeat for ``n > 1``).

    Attributes:
        prompts: token rows (one per sample).
        seeds: one seed per row.
        sampling: how the rows sample.
        logprobs: top log-probs wanted per generated token (None: none; 0: the drawn token's alone).
        prompt_logprobs: top log-probs wanted per prompt position (None: no scoring).
        adapter: the LoRA adapter the rows run with (None: the base model).
        future: resolved with the job's ``Result``.
    """

    prompts: list[list[int]]
    seeds: list[int]
    sampling: SamplingConfig
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    adapter: str | None = None
    future: Future = field(default_factory=Future)


@dataclass
class Call:
    """A change to the served model (new weights, an adapter), run on the worker's thread between batches."""

    fn: Callable[[], object]
    future: Future = field(default_factory=Future)


@dataclass
class Result:
    """Per row: the generated ids (the end token included), their log-probs, whether an end token came, the top
    log-probs per generated token ([(id, logprob)]), and the prompt's scores ([(id, logprob, rank)] per position
    from the second on: the prompt's token first, then the top-k)."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    ended: list[bool]
    top: list[list[list[tuple[int, float]]]] | None
    prompt_scores: list[list[list[tuple[int, float, int]]]] | None


class BatchingWorker:
    """Runs jobs on one model in a background thread, batching the jobs that arrive within ``wait`` seconds.

    Args:
        engine: in-process generation from the served model (its ``options.max_rows`` caps the rows run at once).
        max_rows: the most rows gathered into one batch.
        wait: seconds without a new job after which a batch runs (at most ``20 * wait`` after its first job).
        chunk_size: positions per output-head chunk when scoring.
    """

    def __init__(self, engine: LocalEngine, max_rows: int, wait: float = 0.05, chunk_size: int = 1024) -> None:
        self.engine, self.max_rows, self.wait, self.chunk_size = engine, max_rows, wait, chunk_size
        self.jobs: queue.Queue[Job | Call | None] = queue.Queue()
        self.batches = 0  # batches run so far
        self.thread = threading.Thread(target=self._loop, name="trd-serve-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Future:
        self.jobs.put(job)
        return job.future

    def call(self, fn: Callable[[], object]) -> Future:
        """Run ``fn`` on the worker's thread once the batch in flight is done; the future holds its result."""
        call = Call(fn)
        self.jobs.put(call)
        return call.future

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=60)

    def _loop(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            if isinstance(first, Call):
                _resolve(first.future, first.fn)
                continue
            # Gather until no job came for ``wait`` seconds (a step's requests arrive over some milliseconds), at
            # most ``20 * wait`` in all, or until the batch is full.
            batch, rows, after = [first], len(first.prompts), None
            last = time.monotonic() + 20 * self.wait
            while rows < self.max_rows and after is None:
                try:
                    job = self.jobs.get(timeout=max(min(self.wait, last - time.monotonic()), 0))
                except queue.Empty:
                    break
                if job is None:
                    self.jobs.put(None)  # stop after this batch
                    break
                if isinstance(job, Call):  # the batch gathered so far runs on the old weights, then the change
                    after = job
                    break
                batch.append(job)
                rows += len(job.prompts)
            self.batches += 1
            try:
                results = self.run(batch)
            except Exception as error:  # the requests of a failed batch get the error; the worker goes on
                for job in batch:
                    job.future.set_exception(error)
            else:
                for job, result in zip(batch, results):
                    job.future.set_result(result)
            if after is not None:
                _resolve(after.future, after.fn)

    @torch.no_grad()
    def run(self, jobs: list[Job]) -> list[Result]:
        """The results of ``jobs``, each adapter's jobs run together (see ``_run``), in the order given."""
        done: dict[int, Result] = {}
        for adapter in dict.fromkeys(j.adapter for j in jobs):
            group = [j for j in jobs if j.adapter == adapter]
            with self._adapter(adapter):
                done.update(zip(map(id, group), self._run(group)))
        return [done[id(j)] for j in jobs]

    @contextlib.contextmanager
    def _adapter(self, name: str | None):
        model = self.engine.model
        if not hasattr(model, "peft_config"):
            yield
        elif name is None:
            with model.disable_adapter():
                yield
        else:
            model.set_adapter(name)
            yield

    def _run(self, jobs: list[Job]) -> list[Result]:
        """One model's results: one scoring pass, then one generation call per sampling setting."""
        scoring = [j for j in jobs if j.prompt_logprobs is not None]
        scored = self._score(scoring) if scoring else {}
        out: dict[int, tuple[list, list, list]] = {}
        by_sampling: dict[SamplingConfig, list[Job]] = {}
        for job in jobs:
            if job.prompt_logprobs is not None and job.sampling.max_new_tokens == 1:
                out[id(job)] = self._draw_last(job, scored[id(job)][1])
            else:
                by_sampling.setdefault(job.sampling, []).append(job)
        for sampling, group in by_sampling.items():
            rows = [p for j in group for p in j.prompts]
            seeds = [s for j in group for s in j.seeds]
            prompts = Prompts.from_lists(rows, self.engine.pad_id, self._device)
            generated = self.engine.generate(prompts, sampling, seeds)
            lists, lps = generated.lists(), [row[m].tolist() for row, m in zip(generated.logprobs, generated.mask)]
            ended = (~generated.truncated).tolist()
            start = 0
            for job in group:
                stop = start + len(job.prompts)
                out[id(job)] = (lists[start:stop], lps[start:stop], ended[start:stop])
                start = stop
        results = []
        for job in jobs:
            tokens, lps, ended = out[id(job)]
            if job.logprobs is None:
                top = None
            elif job.logprobs == 0:  # the drawn token's own log-prob, as vLLM gives it
                top = [[[(t, lp)] for t, lp in zip(row, row_lps)] for row, row_lps in zip(tokens, lps)]
            else:
                top = self._generated_top(job, tokens, lps)
            prompt_scores = scored[id(job)][0] if job.prompt_logprobs is not None else None
            results.append(Result(tokens, lps, ended, top, prompt_scores))
        return results

    @property
    def _device(self) -> torch.device:
        return next(self.engine.model.parameters()).device

    def _score(self, jobs: list[Job]) -> dict[int, tuple[list, torch.Tensor]]:
        """Per job: the prompt scores of each of its distinct prompts (samples of one prompt share them, in order)
        and the raw last-position logits of every row."""
        k = max(j.prompt_logprobs for j in jobs)
        rows = [p for j in jobs for p in j.prompts]
        scores, last = [], []
        for start in range(0, len(rows), self.max_rows):
            part_scores, part_last = self._score_rows(rows[start : start + self.max_rows], k)
            scores += part_scores
            last.append(part_last)
        last = torch.cat(last)
        out, start = {}, 0
        for job in jobs:
            stop = start + len(job.prompts)
            mine = [[entries[: 1 + job.prompt_logprobs] for entries in row] for row in scores[start:stop]]
            out[id(job)] = (mine, last[start:stop])
            start = stop
        return out

    def _score_rows(self, rows: list[list[int]], k: int) -> tuple[list, torch.Tensor]:
        model = self.engine.model
        prompts = Prompts.from_lists(rows, self.engine.pad_id, self._device)
        width = prompts.ids.shape[1]
        hidden = last_hidden(model, prompts.ids, prompts.mask)
        lengths = prompts.mask.sum(-1).tolist()
        # Position t of a row (its real tokens only) predicts token t + 1: all but the row's last position.
        keep = torch.zeros_like(prompts.mask, dtype=torch.bool)
        for i, n in enumerate(lengths):
            keep[i, width - n : width - 1] = True
        positions = hidden[keep]
        targets = torch.cat([prompts.ids[i, width - n + 1 :] for i, n in enumerate(lengths)])
        head = output_head(model)
        token_lp, ranks, top_lp, top_ids = [], [], [], []
        for s in range(0, positions.shape[0], self.chunk_size):
            logp = head(positions[s : s + self.chunk_size]).float().log_softmax(-1)
            lp = logp.gather(-1, targets[s : s + self.chunk_size, None])
            token_lp.append(lp[:, 0])
            ranks.append((logp >= lp).sum(-1))
            values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
            top_lp.append(values)
            top_ids.append(ids)
        flat = list(
            zip(
                targets.tolist(),
                torch.cat(token_lp).tolist() if token_lp else [],
                torch.cat(ranks).tolist() if ranks else [],
                torch.cat(top_ids).tolist() if top_ids else [],
                torch.cat(top_lp).tolist() if top_lp else [],
            )
        )
        scores, at = [], 0
        for n in lengths:
            row = []
            for target, lp, rank, ids, values in flat[at : at + n - 1]:
                row.append([(target, lp, rank), *((t, v, r + 1) for r, (t, v) in enumerate(zip(ids, values)))])
            scores.append(row)
            at += n - 1
        last = head(hidden[:, -1]).float()
        return scores, last

    def _draw_last(self, job: Job, last_logits: torch.Tensor) -> tuple[list, list, list]:
        """The one token of a ``max_tokens: 1`` request, drawn from the scoring forward as ``generate`` draws it."""
        logits = last_logits.clone()
        if getattr(self.engine.model.generation_config, "min_new_tokens", None):
            logits[:, self.engine.eos_ids] = float("-inf")
        u = None if job.sampling.greedy else uniforms(job.seeds, 1, logits.device)[:, 0]
        token, logprob = draw(filtered_logprobs(logits, job.sampling), u)
        ids, _, truncated = cut_at_eos(token[:, None], self.engine.eos_ids, self.engine.pad_id)
        return ids.tolist(), logprob[:, None].tolist(), (~truncated).tolist()

    def _generated_top(self, job: Job, tokens: list[list[int]], lps: list[list[float]]) -> list:
        """Per generated token: the drawn token's and the top ``job.logprobs`` log-probs of the distribution it was
        drawn from (one forward over prompt + response)."""
        model, pad = self.engine.model, self.engine.pad_id
        prompts = Prompts.from_lists(job.prompts, pad, self._device)
        width = max(len(t) for t in tokens)
        ids = torch.full((len(tokens), width), pad, dtype=torch.long, device=self._device)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for i, row in enumerate(tokens):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = True
        hidden = last_hidden(model, torch.cat([prompts.ids, ids], 1), torch.cat([prompts.mask, mask.long()], 1))
        rows = response_rows(hidden, prompts.ids.shape[1], mask)
        logp = filtered_logprobs(output_head(model)(rows), job.sampling)
        values, top_ids = logp.topk(min(job.logprobs, logp.shape[-1]), dim=-1)
        drawn = [lp for row in lps for lp in row]
        flat = [
            [(t, lp), *zip(i, v)] for t, lp, i, v in zip(ids[mask].tolist(), drawn, top_ids.tolist(), values.tolist())
        ]
        out, at = [], 0
        for row in tokens:
            out.append(flat[at : at + len(row)])
            at += len(row)
        return out


def _resolve(future: Future, fn: Callable[[], object]) -> None:
    try:
        future.set_result(fn())
    except Exception as error:  # the caller gets the error; the worker goes on
        future.set_exception(error)
