"""Offline TRD: one refinement round written to a dataset, resumable, then trained on without generating."""

from __future__ import annotations

import shlex

import lightning as L
import pytest
from datasets import load_dataset
from helpers import trd

from trd_lightning.cli import cli_main
from trd_lightning.offline import check_round, read_marker, shard_path, write_refinement_round
from trd_lightning.verify import is_correct


def round_rows(folder):
    return sorted(
        load_dataset("parquet", data_files=str(folder / "shard-*.parquet"), split="train").to_list(),
        key=lambda r: r["index"],
    )


def refine_args(tiny, output) -> list[str]:
    return [
        "refine",
        "--output",
        str(output),
        "--device",
        "cpu",
        f"--model.student={tiny['student']}",
        f"--model.teacher={tiny['teacher']}",
        f"--data.train_data={tiny['train']}",
        "--data.refine.enabled=true",
        "--data.batch_size=16",
        "--data.rollout.max_new_tokens=8",
        "--data.validation.split=null",
    ]


def test_round_trip_and_resume_after_an_interruption(make_run, tiny, tmp_path, monkeypatch):
    full = tmp_path / "full"
    done = trd(*refine_args(tiny, full))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = round_rows(full)
    assert len(rows) == 64 and [r["index"] for r in rows] == list(range(64))
    for r in rows:
        assert set(r) >= {"problem", "solution", "answer", "y_o", "y_r", "correct_o", "correct_r"}
        assert r["correct_o"] == is_correct(r["y_o"], r["answer"]) and r["correct_r"] == is_correct(
            r["y_r"], r["answer"]
        )
    # The round is marked complete, with its accuracies, which the command prints.
    marker = read_marker(full)
    accuracy = {name: sum(r[f"correct_{name[-1]}"] for r in rows) / 64 for name in ("y_o", "y_r")}
    assert marker["complete"] and marker["rows"] == 64 and marker["shards"] == 4
    assert marker["accuracy_y_o"] == pytest.approx(accuracy["y_o"])
    assert marker["accuracy_y_r"] == pytest.approx(accuracy["y_r"])
    console = done.stdout + done.stderr
    expected = (
        f"refinement round written to {full}: 64 rows; y_o {accuracy['y_o']:.1%} correct, y_r {accuracy['y_r']:.1%}"
    )
    assert expected in console

    # A crash after two shards: what was written stays, nothing half-written is left, and a rerun completes it.
    part = tmp_path / "part"
    round_data = {"refine": {"enabled": True}, "batch_size": 16, "rollout": {"max_new_tokens": 8}}
    trainer, module, data = make_run(data=round_data)
    calls = {"n": 0}
    original = type(data).produce

    def crashing_produce(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # after two shards
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(data), "produce", crashing_produce)
    with pytest.raises(KeyboardInterrupt):
        write_refinement_round(module, data, part, "cpu")
    assert sorted(p.name for p in part.iterdir()) == [
        "round.json",
        shard_path(part, 0).name,
        shard_path(part, 1).name,
    ]
    assert not read_marker(part)["complete"]
    first_shard = shard_path(part, 0).read_bytes()
    monkeypatch.setattr(type(data), "produce", original)
    write_refinement_round(module, data, part, "cpu")
    assert shard_path(part, 0).read_bytes() == first_shard  # not rewritten
    assert round_rows(part) == rows  # same seeds: the resumed round equals the uninterrupted one
    assert read_marker(part)["complete"]


def test_an_interrupted_round_is_refused_with_the_command_that_finishes_it(tiny, tmp_path, monkeypatch):
    from trd_lightning.data.datamodule import OnPolicyDataModule

    part = tmp_path / "part"
    original, calls = OnPolicyDataModule.produce, {"n": 0}

    def crashing_produce(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # after two of the four shards
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(OnPolicyDataModule, "produce", crashing_produce)
    with pytest.raises(KeyboardInterrupt):
        cli_main(refine_args(tiny, part))
    monkeypatch.setattr(OnPolicyDataModule, "produce", original)
    assert not read_marker(part)["complete"]
    fit = [
        "fit",
        f"--model.student={tiny['student']}",
        f"--model.teacher={tiny['teacher']}",
        "--model.micro_batch_size=4",
        "--data.batch_size=4",
        "--data.refine.enabled=true",
        f"--data.refine.offline_round={part}",
        "--data.validation.split=null",
        "--trainer.max_steps=1",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    refused = trd(*fit)
    finish = shlex.join(["trd", *refine_args(tiny, part)])
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.splitlines()[-1] == (
        f"trd: error: data.refine.offline_round: the refinement round in {part} is incomplete (2 of 4 shards "
        f"written): finish it with `{finish}`."
    )
    # The command it names finishes the round, which then trains.
    cli_main(shlex.split(finish)[1:])
    assert read_marker(part)["complete"] and len(round_rows(part)) == 64
    cli = cli_main(fit)
    assert cli.trainer.global_step == 1


def test_a_round_that_is_not_there_or_not_a_folder_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"data.refine.offline_round: {missing} is not a refinement round"):
        check_round(str(missing))
    (tmp_path / "shards").mkdir()
    with pytest.raises(ValueError, match="holds no complete refinement round"):
        check_round(str(tmp_path / "shards"))


def test_training_on_an_offline_round_uses_y_r_and_the_refine_prompt(make_run, tiny, tmp_path):
    folder = tmp_path / "round"
    round_data = {"refine": {"enabled": True}, "batch_size": 16, "rollout": {"max_new_tokens": 8}}
    trainer, module, data = make_run(data=round_data)
    write_refinement_round(module, data, folder, "cpu")
    rows = {r["problem"]: r for r in round_rows(folder)}

    seen = []

    class Keep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(batch)

    trainer, module, data = make_run(
        root=tmp_path / "fit",
        data={"refine": {"enabled": True, "offline_round": str(folder)}, "rollout": {"max_new_tokens": 8}},
        callbacks=[Keep()],
        max_steps=1,
    )
    trainer.fit(module, data)
    batch, tok = seen[0], data.tokenizer
    train = batch.produced.train
    width = train.response_ids.shape[1]
    assert batch.produced.refined.all() and not train.sampled.any()
    for i, problem in enumerate(batch.problem):
        expected = tok(rows[problem]["y_r"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert train.response_ids[i][train.response_mask[i]].tolist() == expected[:8]
        context = train.teacher_ids[i][:-width][train.teacher_mask[i][:-width].bool()].tolist()
        row = rows[problem]
        assert context == data.rewriter.prompt.ids(row["problem"], row["solution"], row["y_o"])
        assert "Your Initial Solution" in tok.decode(context)
        original = batch.produced.original
        y_o = tok(rows[problem]["y_o"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert original.response_ids[i][original.response_mask[i]].tolist() == y_o[:8]


def test_offline_data_needs_the_refine_prompt():
    from trd_lightning.data.options import RefineOptions

    with pytest.raises(ValueError, match="data.refine.enabled: true"):
        RefineOptions(offline_round="somewhere")
