"""Offline TRD, as the authors' code runs it: one refinement round written to a dataset, then training on it.

    trd refine --config configs/demo_trd.yaml --output runs/refined
    trd fit --config configs/demo_trd.yaml --data.offline_data runs/refined

The round is written as numbered parquet shards, each renamed into place only when complete: an interrupted
round loses nothing already written, and running the same command again writes only the missing shards.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from datasets import Dataset
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm

from trd_lightning.rollout.assemble import pad_left
from trd_lightning.rollout.refiner import RefinementPlan
from trd_lightning.verify import is_correct


def shard_path(output: Path, number: int) -> Path:
    return output / f"shard-{number:05d}.parquet"


@torch.no_grad()
def write_refinement_round(module, data, output: str | Path, device: str | None = None) -> Path:
    """Sample ``y_o`` from the student for every training prompt, refine it into ``y_r``, and write both.

    Rows hold ``problem``, ``solution``, ``answer``, ``y_o``, ``y_r`` and whether each is correct (None
    without answers). Every rollout is refined, as in the authors' pipeline.

    Args:
        module: a DistillationModule (its student and refiner are loaded here).
        data: an OnPolicyDataModule with ``refine: true``.
        output: the folder of shards; shards already there are kept and skipped.
        device: where the models run; defaults to CUDA when available.
    """
    if not data.hparams.refine:
        raise ValueError("An offline refinement round needs the refine prompt: set data.refine: true.")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    data.setup("fit")
    module.configure_model()
    module.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    device = next(module.student.parameters()).device
    data.refiner.plan = RefinementPlan(prob=1.0, mode="all")
    rows, size = data.train_rows, data.hparams.batch_size
    for number, first in enumerate(tqdm(range(0, len(rows), size), desc="refining", unit="batch")):
        target = shard_path(output, number)
        if target.exists():
            continue
        chunk = [rows[i] for i in range(first, min(first + size, len(rows)))]
        ids, mask = (t.to(device) for t in pad_left([r["prompt_ids"] for r in chunk], data.tokenizer.pad_token_id))
        seed = data.hparams.seed * 1_000_003 + number
        out = data.sample(module.student, ids, mask, data.sampling, seed)
        texts = data.tokenizer.batch_decode(out.ids, skip_special_tokens=True)
        answers = [r["answer"] for r in chunk]
        correct = [is_correct(t, a) for t, a in zip(texts, answers)] if None not in answers else None
        result = data.refiner.refine(
            module, data.sample, ids, mask, out, texts, chunk, correct, [r["teacher_ids"] for r in chunk], seed
        )
        records = [
            {
                "index": r["index"],
                "problem": r["problem"],
                "solution": r["solution"],
                "answer": r["answer"],
                "y_o": y_o,
                "y_r": y_r,
                "correct_o": None if correct is None else correct[i],
                "correct_r": None if r["answer"] is None else is_correct(y_r, r["answer"]),
            }
            for i, (r, y_o, y_r) in enumerate(zip(chunk, texts, result.refined_texts))
        ]
        tmp = target.with_suffix(".tmp")
        Dataset.from_list(records).to_parquet(str(tmp))
        os.replace(tmp, target)
    rank_zero_info(f"[trd] refinement round written to {output}")
    return output
