"""Text, figures and histograms reach each logger through its own media API, through the CLI: W&B (offline) and
TensorBoard get them, CSVLogger gets the scalars and one notice per kind of media it cannot take."""

from __future__ import annotations

import csv
import json
import logging
import struct
import time
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_cli import demo_on_tiny

from trd_lightning.cli import cli_main


def one_step(tiny, tmp_path, logger_yaml: str) -> list[str]:
    """Arguments of a one-step fit of the demo config on the tiny models, with the loggers of ``logger_yaml``.

    The demo config's monitors measure at step 0 (a histogram and a figure) and its samples come after step 1;
    the saved config is the first text.
    """
    loggers = tmp_path / "loggers.yaml"
    loggers.write_text(logger_yaml)
    return [
        "fit",
        *demo_on_tiny(tiny),
        "--config",
        str(loggers),
        "--data.validation.split=null",
        "--data.rollout.max_new_tokens=8",
        "--trainer.max_steps=1",
    ]


# ------------------------------------------------------------------ W&B, offline


def wandb_records(path: Path):
    """The records of a W&B run file, read independently of wandb's own reader: a 7-byte header, then 32 KiB
    blocks of [crc u32, length u16, type u8, data] chunks (1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, pending = path.read_bytes(), 7, b""
    while pos + 7 <= len(raw):
        room = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7]) if room >= 7 else (0, 0, 0)
        if room < 7 or (length == 0 and kind == 0):
            pos += room
            continue
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def finished(path: Path, seconds: float = 60.0) -> Path:
    """The run file, once W&B's writer process has written the run's exit record (it writes after ``finish``)."""
    deadline = time.monotonic() + seconds
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(path)):
        assert time.monotonic() < deadline, f"W&B never finished writing {path}"
        time.sleep(0.2)
    return path


def history(path: Path) -> list[dict[str, object]]:
    rows = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            items = {
                "/".join(i.nested_key) if i.nested_key else i.key: json.loads(i.value_json) for i in record.history.item
            }
            rows.append(items)
    return rows


def test_wandb_gets_text_figures_and_histograms(tiny, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    root = tmp_path / "wandb_runs"
    yaml = (
        "trainer:\n  logger:\n    class_path: lightning.pytorch.loggers.WandbLogger\n"
        f"    init_args: {{save_dir: {root}, offline: true, project: trd-tests}}\n"
    )
    try:
        cli_main(one_step(tiny, tmp_path, yaml))
    finally:
        import wandb

        wandb.finish()
    run = next((root / "wandb").glob("offline-run-*"))
    rows = history(finished(next(run.glob("run-*.wandb"))))
    logged = {k: row for row in rows for k in row}
    # The saved config and the samples: HTML files that W&B renders, holding what was sent.
    assert logged["config/_type"]["config/_type"] == "html-file"
    config_html = (run / "files" / logged["config/path"]["config/path"]).read_text()
    assert "teacher_kind: frozen" in config_html and f"student: {tiny['student']}" in config_html
    samples = logged["samples/rollout/_type"]
    assert samples["samples/rollout/_type"] == "html-file" and samples["trainer/global_step"] == 1
    sample_html = (run / "files" / samples["samples/rollout/path"]).read_text()
    assert "<strong>problem</strong>" in sample_html and "Last digit, left to right:" in sample_html
    # The prefix figure: a PNG of the size the figure was drawn at (9 x 2.6 inches at 100 dpi).
    figure = logged["prefix/rollout/_type"]
    png = (run / "files" / figure["prefix/rollout/filenames"][0]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (900, 260)
    # The per-token KL histogram counts every response token the monitor measured: the step's 4 rollouts.
    histogram = logged["teacher/token_kl/y_o/_type"]
    assert histogram["teacher/token_kl/y_o/_type"] == "histogram" and histogram["trainer/global_step"] == 0
    step0 = next(r for r in rows if "train/response_tokens" in r and r["trainer/global_step"] == 0)
    assert sum(histogram["teacher/token_kl/y_o/values"]) == step0["train/response_tokens"]


# ------------------------------------------------------------------ TensorBoard and CSV side by side


@pytest.fixture
def notices(caplog):
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    yield caplog
    logger.removeHandler(caplog.handler)


def test_tensorboard_gets_media_and_csv_gets_scalars_and_one_notice_per_kind(tiny, tmp_path, notices):
    yaml = (
        "trainer:\n  logger:\n"
        f"    - class_path: lightning.pytorch.loggers.TensorBoardLogger\n      init_args: {{save_dir: {tmp_path}/tb}}\n"
        f"    - class_path: lightning.pytorch.loggers.CSVLogger\n      init_args: {{save_dir: {tmp_path}/csv}}\n"
    )
    cli_main(one_step(tiny, tmp_path, yaml))
    events = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents*")).parent))
    events.Reload()
    assert {"config/text_summary", "samples/rollout/text_summary"} <= set(events.Tags()["tensors"])
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert config_text.startswith("<pre>") and "teacher_kind: frozen" in config_text
    assert "teacher/token_kl/y_o" in events.Tags()["histograms"] and "prefix/rollout" in events.Tags()["images"]

    with open(next((tmp_path / "csv").rglob("metrics.csv")), newline="") as handle:
        rows = list(csv.DictReader(handle))
    tb_loss = events.Scalars("train/loss")[0].value
    assert [float(r["train/loss"]) for r in rows if r.get("train/loss")] == pytest.approx([tb_loss])
    # Two texts (the config, the samples), one histogram and one figure reached the CSV logger: one notice each kind.
    said = [r.getMessage() for r in notices.records if "CSVLogger takes no" in r.getMessage()]
    assert said == [
        "[trd] CSVLogger takes no text: config and the other text are not logged there",
        "[trd] CSVLogger takes no histograms: teacher/token_kl/y_o and the other histograms are not logged there",
        "[trd] CSVLogger takes no figures: prefix/rollout and the other figures are not logged there",
    ]
