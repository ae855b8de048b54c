"""Offline TRD, as the authors' code runs it: one refinement round written to a dataset, then training on it.

    trd refine --config configs/demo.yaml --config configs/trd.yaml --output runs/refined
    trd fit --config configs/demo.yaml --config configs/trd.yaml --data.refine.offline_round runs/refined

The round runs the same pipeline as an online step (the student's rollouts, every one rewritten by the refiner),
batch by batch, and writes numbered parquet shards, each renamed into place only when complete: an interrupted round
loses nothing already written, and running the same command again writes only the missing shards and gives the
rows an uninterrupted round would have (every row's seeds come from its dataset index).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from datasets import Dataset
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm

from trd_lightning.rollout.batch import StepInfo
from trd_lightning.rollout.selection import RefinementPlan


def shard_path(output: Path, number: int) -> Path:
    return output / f"shard-{number:05d}.parquet"


@torch.no_grad()
def write_refinement_round(module, data, output: str | Path, device: str | None = None) -> Path:
    """Sample ``y_o`` from the student for every training prompt, rewrite it into ``y_r``, and write both.

    Rows hold ``index``, ``problem``, ``solution``, ``answer``, ``y_o``, ``y_r`` and whether each is correct (None
    without answers). Every rollout is rewritten, as in the authors' pipeline.

    Args:
        module: a DistillationModule (its student and refiner are loaded here).
        data: an OnPolicyDataModule with ``refine.enabled`` (and no ``refine.offline_round``).
        output: the folder of shards; shards already there are kept and skipped.
        device: where the models run; defaults to CUDA when available.
    """
    refine = data.refine
    if not refine.enabled or refine.offline_round:
        raise ValueError(
            "An offline refinement round needs the refine prompt and the refiner: set data.refine.enabled: true "
            "(and no data.refine.offline_round)."
        )
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    data.setup("fit")
    module.configure_model()
    module.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    device = next(module.student.parameters()).device
    data.plan_refinement(RefinementPlan(prob=1.0, mode="all"))
    rows, size = data.train_rows, data.hparams.batch_size
    for number, first in enumerate(tqdm(range(0, len(rows), size), desc="refining", unit="batch")):
        target = shard_path(output, number)
        if target.exists():
            continue
        batch = data.collate([rows[i] for i in range(first, min(first + size, len(rows)))]).to(device)
        produced = data.produce(batch, module.rollout_models(), StepInfo(step=0))
        expanded = batch.repeat(produced.num_generations)
        correct_o = data.verify(produced.rollout_text, expanded.answer)
        correct_r = data.verify(produced.refined_text, expanded.answer)
        records = [
            {
                "index": int(expanded.index[i]),
                "problem": expanded.problem[i],
                "solution": expanded.solution[i],
                "answer": expanded.answer[i],
                "y_o": produced.rollout_text[i],
                "y_r": produced.refined_text[i],
                "correct_o": None if correct_o is None else correct_o[i],
                "correct_r": None if correct_r is None else correct_r[i],
            }
            for i in range(len(produced.rollout_text))
        ]
        tmp = target.with_suffix(".tmp")
        Dataset.from_list(records).to_parquet(str(tmp))
        os.replace(tmp, target)
    rank_zero_info(f"[trd] refinement round written to {output}")
    return output
