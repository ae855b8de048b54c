"""Offline TRD, as the authors' code runs it: one refinement round written to a dataset, then training on it.

    trd refine --config configs/demo.yaml --config configs/trd.yaml --output runs/refined
    trd fit --config configs/demo.yaml --config configs/trd.yaml --data.refine.offline_round runs/refined

The round runs the same pipeline as an online step (the student's rollouts, every one rewritten by the refiner),
batch by batch, and writes numbered parquet shards, each renamed into place only when complete: an interrupted round
loses nothing already written, and running the same command again writes only the missing shards and gives the
rows an uninterrupted round would have (every row's seeds come from its dataset index).

``round.json`` beside the shards says whether the round is complete, the command that writes it, and, once complete,
its rows and the accuracies of ``y_o`` and ``y_r``; training refuses a round that is not complete (``check_round``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from datasets import Dataset
from lightning.pytorch.utilities import rank_zero_info
from tqdm.auto import tqdm

from trd_lightning.rollout.batch import StepInfo
from trd_lightning.rollout.selection import RefinementPlan

MARKER = "round.json"


def shard_path(output: Path, number: int) -> Path:
    return output / f"shard-{number:05d}.parquet"


def read_marker(folder: str | Path) -> dict | None:
    """The round's ``round.json`` (None when there is none)."""
    path = Path(folder) / MARKER
    return json.loads(path.read_text()) if path.is_file() else None


def _write_marker(folder: Path, marker: dict) -> None:
    tmp = folder / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=1) + "\n")
    os.replace(tmp, folder / MARKER)


def check_round(folder: str, option: str = "data.refine.offline_round") -> dict:
    """The marker of a complete round in ``folder``; an error naming ``option`` and the command that writes or
    finishes the round otherwise."""
    path = Path(folder).expanduser()
    write = f"trd refine --config ... --output {folder}"
    if not path.is_dir():
        raise FileNotFoundError(
            f"{option}: {folder} is not a refinement round (no such folder): write it with `{write}`."
        )
    marker = read_marker(path)
    if marker is None:
        raise ValueError(
            f"{option}: {folder} holds no complete refinement round (no {MARKER}): run `{write}` with the config that "
            "wrote it; it keeps the shards already there and marks the round complete."
        )
    if not marker.get("complete"):
        done = sum(shard_path(path, i).exists() for i in range(marker["shards"]))
        finish = marker.get("command") or write
        raise ValueError(
            f"{option}: the refinement round in {folder} is incomplete ({done} of {marker['shards']} shards written): "
            f"finish it with `{finish}`."
        )
    return marker


def round_summary(folder: Path, shards: int) -> dict:
    """Rows and the share of correct ``y_o`` and ``y_r`` over the round's shards (None without answers)."""
    import pyarrow.parquet as pq

    columns, rows = {"correct_o": [], "correct_r": []}, 0
    for number in range(shards):
        table = pq.read_table(shard_path(folder, number))
        rows += table.num_rows
        for name in columns:
            columns[name] += table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows

    def share(values: list) -> float | None:
        known = [v for v in values if v is not None]
        return sum(known) / len(known) if known and len(known) == len(values) else None

    return {"rows": rows, "accuracy_y_o": share(columns["correct_o"]), "accuracy_y_r": share(columns["correct_r"])}


def mark_complete(folder: str | Path, shards: int | None = None, command: str | None = None) -> dict:
    """Mark the round in ``folder`` complete (its ``round.json``, with its rows and accuracies) and return the summary;
    ``trd refine`` does it when it has written every shard, and a round built another way (shards numbered from 0, the
    columns ``trd refine`` writes) can be marked with it.

    Args:
        folder: the round's folder.
        shards: how many shards the round has; None counts them (``shard-00000.parquet`` on, without a gap).
        command: the command that wrote the round.
    """
    folder = Path(folder)
    if shards is None:
        shards = 0
        while shard_path(folder, shards).exists():
            shards += 1
    missing = [n for n in range(shards) if not shard_path(folder, n).exists()]
    if not shards or missing:
        raise ValueError(f"{folder} lacks shard {missing[0] if missing else 0}: it is not a whole refinement round.")
    summary = round_summary(folder, shards)
    _write_marker(folder, {"complete": True, "shards": shards, "command": command, **summary})
    return summary


@torch.no_grad()
def write_refinement_round(
    module, data, output: str | Path, device: str | None = None, command: str | None = None
) -> Path:
    """Sample ``y_o`` from the student for every training prompt, rewrite it into ``y_r``, and write both.

    Rows hold ``index``, ``problem``, ``solution``, ``answer``, ``y_o``, ``y_r`` and whether each is correct (None
    without answers). Every rollout is rewritten, as in the authors' pipeline.

    Args:
        module: a DistillationModule (its student and refiner are loaded here).
        data: an OnPolicyDataModule with ``refine.enabled`` (and no ``refine.offline_round``).
        output: the folder of shards; shards already there are kept and skipped.
        device: where the models run; defaults to CUDA when available.
        command: the command that writes this round, which ``check_round`` names for an incomplete one.
    """
    refine = data.refine
    if not refine.enabled or refine.offline_round:
        raise ValueError(
            "An offline refinement round needs the refine prompt and the refiner: set data.refine.enabled: true "
            "(and no data.refine.offline_round)."
        )
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise FileExistsError(
            f"--output {output} is a file: a refinement round is a folder of shards; name a new or existing folder."
        )
    data.setup("fit")
    module.configure_model()
    module.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    device = next(module.student.parameters()).device
    data.plan_refinement(RefinementPlan(prob=1.0, mode="all"))
    rows, size = data.train_rows, data.hparams.batch_size
    shards = math.ceil(len(rows) / size)
    output.mkdir(parents=True, exist_ok=True)
    if (read_marker(output) or {}).get("shards") not in (None, shards):
        raise ValueError(
            f"--output {output} holds a round of {read_marker(output)['shards']} shards, this config makes {shards}: "
            "name another folder for this round."
        )
    _write_marker(output, {"complete": False, "shards": shards, "command": command})
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
    summary = mark_complete(output, shards, command)
    accuracies = ", ".join(
        f"{name} {summary[f'accuracy_{name}']:.1%} correct"
        for name in ("y_o", "y_r")
        if summary[f"accuracy_{name}"] is not None
    )
    rank_zero_info(
        f"[trd] refinement round written to {output}: {summary['rows']} rows"
        + (f"; {accuracies}" if accuracies else "")
    )
    return output
