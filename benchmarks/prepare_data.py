"""Data preparation at start: the first start, a cached start, and the per-row loop it replaced, side by side.

    OMP_NUM_THREADS=1 python benchmarks/prepare_data.py                  # 200,000 rows, OPSD prompts
    OMP_NUM_THREADS=1 python benchmarks/prepare_data.py --workers 2      # the map on 2 worker processes

A synthetic dataset of demo-world problems with their reference solutions is written as one parquet file, then
prepared as a run prepares its training split: ``load_rows`` (``datasets`` turns the file into its Arrow cache)
and ``prepare_rows`` (the batched ``datasets.map`` tokenizing the student prompt and the privileged teacher prompt
through the chat template of the demo tokenizer, cached by fingerprint). Three timings:

* ``first start``: both steps with empty caches (a fresh cache folder for ``datasets`` and for the prepared rows);
* ``cached start``: the same two calls again, on fresh objects (a new tokenizer and dataset, as after a restart
  or on another rank): they find both caches;
* ``per-row loop``: the same rows through one ``prompts.to_prompt_ids`` call per prompt, as the DataModule did
  before (a list of dicts, nothing cached); ``--skip-loop`` leaves it out.

The script checks that the loop and the map give the same ids on the first 1,000 rows.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def per_row_loop(dataset, tokenizer, student_template: str, privileged_template: str, budget: int) -> list[dict]:
    """The preparation the map replaced: one tokenizer call per prompt, in one process."""
    from trd_lightning import prompts

    rows = []
    for i, example in enumerate(dataset):
        row = {k: example[k] for k in ("problem", "solution", "answer")}
        ids = prompts.to_prompt_ids(prompts.render(student_template, **row), tokenizer, True)
        teacher = prompts.fit_prompt(privileged_template, row, tokenizer, budget, ("solution",))
        rows.append({**row, "index": i, "prompt_ids": ids, "teacher_ids": teacher})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=None, help="num_proc of the map (default: in-process)")
    parser.add_argument("--skip-loop", action="store_true", help="leave out the per-row loop")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="prepare-bench-"))
    # datasets reads its cache folder at import: point it at an empty one before importing anything that uses it.
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf-datasets")
    from datasets import Dataset, disable_progress_bars

    from trd_lightning import prompts
    from trd_lightning.data.demo.task import make_rows
    from trd_lightning.data.rows import RowFormat, prepare_rows
    from trd_lightning.data.sources import load_rows
    from trd_lightning.hf import load_tokenizer

    disable_progress_bars()
    source = work / "train.parquet"
    Dataset.from_list(make_rows(args.rows, seed=11)).to_parquet(str(source))
    fmt = RowFormat("{problem}", prompts.PRIVILEGED_TEMPLATE, 512, 1024)
    columns = {"problem": "problem", "solution": "solution", "answer": "answer"}
    cache = str(work / "prepared")

    def start() -> tuple[float, object]:
        begin = time.perf_counter()
        dataset = load_rows(str(source), "train")
        rows = prepare_rows(dataset, columns, load_tokenizer("trd-demo/student"), fmt, "bench", cache, args.workers)
        return time.perf_counter() - begin, rows

    first, rows = start()
    cached, again = start()
    assert again.to_list()[:1000] == rows.to_list()[:1000]
    print(f"rows: {len(rows):,} (OPSD: student and privileged teacher prompts), workers: {args.workers or 1}")
    print(f"first start  (load + map, empty caches): {first:8.2f} s")
    print(f"cached start (load + map, both cached):  {cached:8.2f} s   first / cached = {first / cached:,.0f}x")
    if not args.skip_loop:
        dataset, tokenizer = load_rows(str(source), "train"), load_tokenizer("trd-demo/student")
        begin = time.perf_counter()
        looped = per_row_loop(dataset, tokenizer, fmt.student_template, fmt.privileged_template, 1024)
        loop = time.perf_counter() - begin
        assert looped[:1000] == rows.select(range(1000)).to_list()
        print(
            f"per-row loop (every start, no cache):   {loop:8.2f} s   loop / first = {loop / first:.2f}x, "
            f"loop / cached = {loop / cached:,.0f}x"
        )


if __name__ == "__main__":
    main()
