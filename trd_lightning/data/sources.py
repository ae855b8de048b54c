"""Loading prompt datasets through ``datasets``: hub names, local files and folders, and the demo world."""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, load_dataset, load_from_disk

from trd_lightning.data.demo import world

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(source: str, split: str, subset: str | None = None) -> Dataset:
    """One split of a dataset.

    Args:
        source: ``trd-demo`` (the embedded demo world), a local ``.json``/``.jsonl``/``.parquet``/``.csv`` file,
            a folder written by ``Dataset.save_to_disk``, or a Hugging Face hub dataset name.
        split: the split to read (ignored for a single local file, which is one split).
        subset: the hub dataset's configuration name, when it has several.
    """
    if world.is_demo(source):
        return Dataset.from_list(world.rows(split))
    path = Path(source).expanduser()
    if path.suffix.lower() in FILE_BUILDERS:
        if not path.exists():
            raise FileNotFoundError(f"Dataset file {path} does not exist.")
        try:
            return load_dataset(FILE_BUILDERS[path.suffix.lower()], data_files=str(path), split="train")
        except (StopIteration, ValueError) as err:
            # `datasets` reports a file without rows as a missing split (or not at all, for empty jsonl).
            if path.stat().st_size == 0 or isinstance(err, StopIteration) or "corresponds to no data" in str(err):
                raise ValueError(f"Dataset {source!r} is empty: point the data config at rows to train on.") from err
            raise
    if path.is_dir() and (path / "dataset_info.json").exists():
        return load_from_disk(str(path))
    if path.is_dir() and (path / "dataset_dict.json").exists():
        return load_from_disk(str(path))[split]
    return load_dataset(source, subset, split=split)


def check_columns(dataset: Dataset, columns: dict[str, str | None], source: str) -> None:
    """Raise a ValueError naming the unknown columns and the ones the dataset has."""
    missing = {role: col for role, col in columns.items() if col is not None and col not in dataset.column_names}
    if missing:
        wanted = ", ".join(f"{role}_column={col!r}" for role, col in missing.items())
        raise ValueError(
            f"Dataset {source!r} has no column for {wanted}. Its columns are {dataset.column_names}: "
            "set the column names in the data config."
        )
