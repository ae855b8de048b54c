"""One step of overlap (``data.rollout.max_staleness: 1``): step t+1's batch is made while step t trains.

Versions count optimizer steps: at step t the student holds version t. At the start of step t, the batch made for it
in the background is taken (its rollouts from version t-1: one step stale), the engine gets version t, and the
making of step t+1's batch starts from it on a background thread. Everything that thread does goes to services (the
student's engine, the refiner) or to the verifier, never to the trainer's models.

The prompts of step t+1 come from the DataLoader: ``loader`` wraps it so that each yielded batch's successor is
known when the batch is produced. The last batch of an epoch has none, so the first step of each epoch (and the
first step after a resume) is made synchronously, from the current weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from trd_lightning.rollout.batch import DistillBatch, PromptBatch


class Overlap:
    """The batch being made for the next step, and the successors of the batches the DataLoader has yielded."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="trd-rollouts")
        self._pending: tuple[tuple[int, ...], Future] | None = None
        self._next: dict[tuple[int, ...], PromptBatch | None] = {}

    def loader(self, loader: Iterable[PromptBatch]) -> Iterable[PromptBatch]:
        """``loader`` yielding the same batches, each one's successor recorded first."""
        return _Lookahead(loader, self._next)

    def take(self, batch: PromptBatch) -> DistillBatch | None:
        """The batch made in the background for ``batch``'s prompts (waiting for it to finish), or None when none
        was started for them. A failure there (a service gone) is raised here, in the training loop."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        key, future = pending
        if key != _key(batch):  # not this step's prompts (a restarted epoch): drop it
            future.cancel()
            return None
        return future.result()

    def start(self, batch: PromptBatch, make: Callable[[PromptBatch], DistillBatch]) -> None:
        """Start ``make`` on the successor of ``batch`` (on ``batch``'s device), if the DataLoader has one."""
        upcoming = self._next.pop(_key(batch), None)
        if upcoming is not None:
            upcoming = upcoming.to(batch.prompts.ids.device)
            self._pending = (_key(upcoming), self._pool.submit(make, upcoming))

    def close(self) -> None:
        """Stop: a batch still being made is not waited for."""
        if self._pending is not None:
            self._pending[1].cancel()
            self._pending = None
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Lookahead:
    def __init__(self, loader: Iterable[PromptBatch], successors: dict) -> None:
        self.inner, self.successors = loader, successors

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self) -> Iterator[PromptBatch]:
        self.successors.clear()
        batches = iter(self.inner)
        current = next(batches, None)
        while current is not None:
            following = next(batches, None)
            self.successors[_key(current)] = following
            yield current
            current = following


def _key(batch: PromptBatch) -> tuple[int, ...]:
    """A batch's rows (dataset positions): unique within an epoch."""
    index = batch.index
    return tuple(index.tolist() if isinstance(index, torch.Tensor) else index)
