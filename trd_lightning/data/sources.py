"""Loading prompt datasets through ``datasets``: hub names, local files and folders, and the demo world."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from datasets import Dataset, load_dataset, load_from_disk

from trd_lightning.data.demo import world

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(source: str, split: str, subset: str | None = None, option: str = "data.train_data") -> Dataset:
    """One split of a dataset.

    Args:
        source: ``trd-demo`` (the embedded demo world), a local ``.json``/``.jsonl``/``.parquet``/``.csv`` file,
            a folder written by ``Dataset.save_to_disk``, or a Hugging Face hub dataset name.
        split: the split to read (ignored for a single local file, which is one split).
        subset: the hub dataset's configuration name, when it has several.
        option: the setting that named ``source``, which an error names.
    """
    if world.is_demo(source):
        return Dataset.from_list(world.rows(split))
    path = Path(source).expanduser()
    if path.suffix.lower() in FILE_BUILDERS:
        return _load_file(path, source, option)
    if path.is_dir() and (path / "dataset_info.json").exists():
        return load_from_disk(str(path))
    if path.is_dir() and (path / "dataset_dict.json").exists():
        return load_from_disk(str(path))[split]
    try:
        return load_dataset(source, subset, split=split)
    except (ConnectionError, FileNotFoundError) as err:
        # Not local, and the hub could not give it (offline, no network, or no such dataset).
        reason = " ".join(str(err).split())
        raise FileNotFoundError(
            f"{option}={source!r} is no local file or folder, and the hub could not provide it ({reason}): download it "
            f"once while online (it is then read from the cache), or set {option} to a local copy."
        ) from err


def _load_file(path: Path, source: str, option: str = "data.train_data") -> Dataset:
    """A local file as one split; a file that cannot be read raises a ValueError naming it and its bad line."""
    if not path.exists():
        raise FileNotFoundError(f"{option}: dataset file {path} does not exist.")
    builder = FILE_BUILDERS[path.suffix.lower()]
    try:
        return load_dataset(builder, data_files=str(path), split="train")
    except Exception as err:
        # `datasets` reports a file without rows as a missing split (or not at all, for empty jsonl).
        if path.stat().st_size == 0 or isinstance(err, StopIteration) or "corresponds to no data" in str(err):
            raise ValueError(f"Dataset {source!r} is empty: point the data config at rows to train on.") from err
        where = {"json": _bad_json_line, "csv": _bad_csv_line, "parquet": _bad_parquet_part}[builder](path)
        detail = where or f"{type(_root(err)).__name__}: {_root(err)}"
        raise ValueError(
            f"Dataset file {path} could not be read: {detail}. Fix the file or point the data config at another one."
        ) from err


def _root(err: BaseException) -> BaseException:
    """The innermost cause of an exception (``datasets`` wraps the parser's error in its own)."""
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return err


def _bad_json_line(path: Path) -> str | None:
    """Where a JSON or JSON-lines file first goes wrong (1-based line), or None when its syntax is fine."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        json.loads(text)
        return None  # one valid document: the trouble is its shape, which the caller reports
    except json.JSONDecodeError as err:
        if err.msg != "Extra data":
            return f"line {err.lineno}, column {err.colno}: {err.msg}"
    # Several documents: JSON lines, one object per line.
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            return f"line {number}, column {err.colno}: {err.msg}"
        if not isinstance(value, dict):
            return f"line {number} is a JSON {type(value).__name__}, not an object with the row's columns"
    return None


def _bad_csv_line(path: Path) -> str | None:
    """The first CSV record whose field count differs from the header's (1-based line), or None."""
    with open(path, newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            return None
        for record in reader:
            if record and len(record) != len(header):
                return f"line {reader.line_num} has {len(record)} fields, the header has {len(header)}"
    return None


def _bad_parquet_part(path: Path) -> str | None:
    """The footer or the first row group (with its rows) that pyarrow cannot read, or None."""
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except Exception as err:
        return f"not a readable parquet file ({err})"
    first = 0
    for group in range(file.num_row_groups):
        rows = file.metadata.row_group(group).num_rows
        try:
            file.read_row_group(group)
        except Exception as err:
            return f"row group {group} (rows {first} to {first + rows - 1}) is corrupt ({err})"
        first += rows
    return None


TEXT_TYPES = {"string", "large_string", "null"}


def check_columns(dataset: Dataset, columns: dict[str, str | None], source: str) -> None:
    """Raise a ValueError naming the unknown columns and the ones the dataset has, or a problem or reference column
    that holds something other than text (numbers would be cast to strings without a word)."""
    missing = {role: col for role, col in columns.items() if col is not None and col not in dataset.column_names}
    if missing:
        wanted = ", ".join(f"{role}_column={col!r}" for role, col in missing.items())
        raise ValueError(
            f"Dataset {source!r} has no column for {wanted}. Its columns are {dataset.column_names}: "
            "set the column names in the data config."
        )
    for role in ("problem", "solution"):
        column = columns.get(role)
        feature = dataset.features.get(column) if column is not None else None
        kind = getattr(feature, "dtype", type(feature).__name__)
        if feature is not None and kind not in TEXT_TYPES:
            raise ValueError(
                f"Dataset {source!r}: the {role} column {column!r} holds {kind} values, not text: point "
                f"{role}_column at the column with the {role} text."
            )
