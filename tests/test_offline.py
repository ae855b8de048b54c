"""Offline TRD: one refinement round written to a dataset, resumable, then trained on without generating."""

from __future__ import annotations

import lightning as L
import pytest
from datasets import load_dataset
from helpers import make_run

from trd_lightning.cli import cli_main
from trd_lightning.offline import shard_path, write_refinement_round
from trd_lightning.verify import is_correct


def round_rows(folder):
    return sorted(
        load_dataset("parquet", data_files=str(folder / "shard-*.parquet"), split="train").to_list(),
        key=lambda r: r["index"],
    )


def test_round_trip_and_resume_after_an_interruption(tiny, tmp_path, monkeypatch):
    full = tmp_path / "full"
    cli_main(
        [
            "refine",
            "--output",
            str(full),
            "--device",
            "cpu",
            f"--model.student={tiny['student']}",
            f"--model.teacher={tiny['teacher']}",
            f"--data.train_data={tiny['train']}",
            "--data.refine=true",
            "--data.batch_size=16",
            "--data.max_new_tokens=8",
            "--data.val_split=null",
        ]
    )
    rows = round_rows(full)
    assert len(rows) == 64 and [r["index"] for r in rows] == list(range(64))
    for r in rows:
        assert set(r) >= {"problem", "solution", "answer", "y_o", "y_r", "correct_o", "correct_r"}
        assert r["correct_o"] == is_correct(r["y_o"], r["answer"]) and r["correct_r"] == is_correct(
            r["y_r"], r["answer"]
        )

    # A crash after two shards: what was written stays, nothing half-written is left, and a rerun completes it.
    part = tmp_path / "part"
    trainer, module, data = make_run(tiny, tmp_path, data={"refine": True, "batch_size": 16, "max_new_tokens": 8})
    calls = {"n": 0}
    original = type(data).sample

    def crashing_sample(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # two shards = 2 x (rollout + refinement) samples
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(data), "sample", crashing_sample)
    with pytest.raises(KeyboardInterrupt):
        write_refinement_round(module, data, part, "cpu")
    assert sorted(p.name for p in part.iterdir()) == [shard_path(part, 0).name, shard_path(part, 1).name]
    first_shard = shard_path(part, 0).read_bytes()
    monkeypatch.setattr(type(data), "sample", original)
    write_refinement_round(module, data, part, "cpu")
    assert shard_path(part, 0).read_bytes() == first_shard  # not rewritten
    assert round_rows(part) == rows  # same seeds: the resumed round equals the uninterrupted one


def test_training_on_an_offline_round_uses_y_r_and_the_refine_prompt(tiny, tmp_path):
    folder = tmp_path / "round"
    trainer, module, data = make_run(tiny, tmp_path, data={"refine": True, "batch_size": 16, "max_new_tokens": 8})
    write_refinement_round(module, data, folder, "cpu")
    rows = {r["problem"]: r for r in round_rows(folder)}

    seen = []

    class Keep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(batch)

    trainer, module, data = make_run(
        tiny,
        tmp_path / "fit",
        data={"refine": True, "offline_data": str(folder), "max_new_tokens": 8},
        callbacks=[Keep()],
        max_steps=1,
    )
    trainer.fit(module, data)
    b, tok = seen[0], data.tokenizer
    width = b["response_ids"].shape[1]
    for i, problem in enumerate(b["problem"]):
        expected = tok(rows[problem]["y_r"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert b["response_ids"][i][b["response_mask"][i]].tolist() == expected[:8]
        context = b["teacher_ids"][i][:-width][b["teacher_mask"][i][:-width].bool()].tolist()
        row = rows[problem]
        assert context == data.refiner.prompt_ids(row["problem"], row["solution"], row["y_o"])
        assert "Your Initial Solution" in tok.decode(context)


def test_offline_data_needs_the_refine_prompt(tiny):
    from trd_lightning import OnPolicyDataModule

    with pytest.raises(ValueError, match="data.refine: true"):
        OnPolicyDataModule(tokenizer=tiny["student"], offline_data="somewhere")
