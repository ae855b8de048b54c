"""FSDP2 sharding on CPU: two processes (gloo) against one process, checkpoints in both forms, resume.

One torchrun launch (tests/fsdp_worker.py) runs every sharded fit one after the other in the same two processes,
while this process runs the single-process references of the same configs. Rollouts and refinement are greedy, so
a step sees the same prompts and the same responses either way and the losses must agree to rounding.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from fsdp_worker import fit
from torch.distributed.checkpoint import FileSystemReader

from trd_lightning import FSDP2Strategy
from trd_lightning.cli import cli_main
from trd_lightning.offline import mark_complete

TRD = {"data": {"refine": {"enabled": True}}}
LORA = {"model": {"lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"}}}
PARTIAL = {"data": {"refine": {"enabled": True}, "rollout": {"max_generation_rows": 1}}, "refine_prob": 0.4}
EMA = {
    "model": {"teacher": None, "teacher_kind": "shared", "shared_weights": "ema", "ema_decay": 0.5},
    "data": {"teacher_context": "privileged"},
}


def offline_round(tiny: dict, folder: Path) -> dict:
    """A written refinement round (what ``trd refine`` writes), so that the student's first call is a training
    forward, not generation."""
    rows = [json.loads(line) for line in Path(tiny["train"]).read_text().splitlines()]
    folder.mkdir()
    Dataset.from_list([{**r, "y_o": r["solution"][::-1], "y_r": r["solution"]} for r in rows]).to_parquet(
        folder / "shard-00000.parquet"
    )
    mark_complete(folder)
    return {"data": {"refine": {"enabled": True, "offline_round": str(folder)}}}


def sharded_runs(root: Path, tiny: dict, offline: dict) -> list[dict]:
    sharded = {"strategy": {}}
    full = {"strategy": {"save_distributed_checkpoint": False}}
    return [
        {"name": "trd", **TRD, **sharded, "max_steps": 4, "save_every": 2, "export": "merged"},
        {"name": "trd_resumed", **TRD, **sharded, "max_steps": 4, "resume": str(root / "trd" / "step=2.ckpt")},
        {
            "name": "trd_full",
            "data": {
                "refine": {"enabled": True},
                "validation": {"data": tiny["validation"], "split": "train", "max_prompts": 8, "batch_size": 4},
            },
            "strategy": {"save_distributed_checkpoint": False, "activation_checkpointing": True},
            "trainer": {"val_check_interval": 2},
            "max_steps": 4,
            "stop_after": 2,
            "save_every": 2,
        },
        {"name": "trd_full_resumed", **TRD, **full, "max_steps": 4, "resume": str(root / "trd_full" / "step=2.ckpt")},
        {"name": "ema", **EMA, **sharded, "max_steps": 3, "save_every": 2},
        {"name": "ema_resumed", **EMA, **sharded, "max_steps": 3, "resume": str(root / "ema" / "step=2.ckpt")},
        {"name": "bf16", **TRD, "strategy": {"mixed_precision": True}, "max_steps": 1},
        {"name": "offline", **offline, **sharded, "max_steps": 3},
        # 40% of the rollouts refined, one row generated at a time: the ranks rewrite different numbers of rows, and the
        # one with fewer steps along on stand-in rows so that every sharded forward stays collective.
        {"name": "partial", **PARTIAL, **sharded, "max_steps": 2},
        {"name": "lora", **LORA, "strategy": {"activation_checkpointing": True}, "max_steps": 3, "export": "merged"},
        {"name": "lora_adapter", **LORA, **sharded, "max_steps": 1, "export": "adapter"},
    ]


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """(sharded results, single-process results, sharded root, single-process root)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    root, ref_root = tmp / "sharded", tmp / "single"
    spec, out = tmp / "spec.json", tmp / "out.json"
    offline = offline_round(tiny, tmp / "offline")
    spec.write_text(json.dumps({"tiny": tiny, "root": str(root), "runs": sharded_runs(root, tiny, offline)}))
    worker = Path(__file__).with_name("fsdp_worker.py")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # Start the two processes first: the single-process references run here while they import.
    proc = subprocess.Popen(
        [*launch, str(worker), str(spec), str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        single = {
            "trd": fit(
                tiny, str(ref_root), {"name": "trd", **TRD, "max_steps": 4, "save_every": 2, "export": "merged"}
            ),
            "ema": fit(tiny, str(ref_root), {"name": "ema", **EMA, "max_steps": 3}),
            "offline": fit(tiny, str(ref_root), {"name": "offline", **offline, "max_steps": 3}),
            "lora": fit(tiny, str(ref_root), {"name": "lora", **LORA, "max_steps": 3, "export": "merged"}),
            "partial": fit(tiny, str(ref_root), {"name": "partial", **PARTIAL, "max_steps": 2}),
        }
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # the launcher and both of its workers
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
    assert proc.returncode == 0, log[-4000:]
    sharded = json.loads(out.read_text())
    return sharded, {k: {"losses": r.losses, "facts": r.facts} for k, r in single.items()}, root, ref_root


def losses(result: dict) -> dict[int, float]:
    return {int(step): value for step, value in result["losses"].items()}


def test_sharded_fit_matches_one_process(runs):
    """OPD with TRD refinement (rollouts by the sharded student, rewrites by the sharded teacher, several micro-batches
    and loss chunks): the same losses as one process, and the same weights after two steps."""
    sharded, single, root, ref_root = runs
    assert sorted(losses(sharded["trd"])) == [1, 2, 3, 4]
    assert losses(sharded["trd"]) == pytest.approx(losses(single["trd"]), rel=1e-4, abs=1e-7)
    # Activation checkpointing recomputes, it does not change the numbers.
    assert losses(sharded["trd_full"]) == pytest.approx({s: losses(single["trd"])[s] for s in (1, 2)}, rel=1e-4)
    ours = torch.load(root / "trd_full" / "step=2.ckpt", weights_only=False)["state_dict"]
    reference = torch.load(ref_root / "trd" / "step=2.ckpt", weights_only=False)["state_dict"]
    assert ours.keys() == reference.keys() and any(k.startswith("student.model.embed_tokens") for k in ours)
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], atol=2e-6, rtol=1e-4, msg=key)


def test_ranks_that_rewrite_different_numbers_of_rows_stay_in_step(runs):
    """40% of the rollouts refined, one row per generation: each rank rewrites its own share (the seeds follow the rows,
    not the ranks), the rank with fewer rows steps along on stand-in rows, and the losses are one process's."""
    sharded, single, _, _ = runs
    assert sorted(losses(sharded["partial"])) == [1, 2]
    assert losses(sharded["partial"]) == pytest.approx(losses(single["partial"]), rel=1e-4, abs=1e-7)
    per_step = sharded["partial"]["facts"]["refined_per_rank"]
    assert any(first != second for first, second in per_step)  # the ranks did rewrite different numbers of rows
    assert [sum(step) for step in per_step] == [sum(step) for step in single["partial"]["facts"]["refined_per_rank"]]


def test_offline_round_trains_the_same_sharded(runs):
    """Without generation, the student's first call is the decoder itself: the model-level group (embeddings,
    head) must still have its gradients reduced, or step 2 would see other weights."""
    sharded, single, _, _ = runs
    assert sorted(losses(sharded["offline"])) == [1, 2, 3]
    assert losses(sharded["offline"]) == pytest.approx(losses(single["offline"]), rel=1e-4, abs=1e-7)


def test_lora_student_trains_the_same_sharded(runs):
    """A peft LoRA student with activation checkpointing: the base model is sharded under the adapter, and only
    the adapter is optimized."""
    sharded, single, _, _ = runs
    facts = sharded["lora"]["facts"]
    assert facts["student_sharded"] and facts["optimizer_only_student"] and facts["checkpointed_layers"]
    assert facts["optimizer_states"] == single["lora"]["facts"]["optimizer_states"] == 14  # 7 linear layers x (A, B)
    assert losses(sharded["lora"]) == pytest.approx(losses(single["lora"]), rel=1e-4, abs=1e-7)


def test_sharded_students_export_like_one_process(runs):
    """ExportStudent gathers the shards to rank 0: the written model (full fine-tuning, and LoRA merged) equals the
    one-process export, and a sharded LoRA student can also be written as its adapter alone."""
    from safetensors.torch import load_file

    _, _, root, ref_root = runs
    for name in ("trd", "lora"):
        ours, reference = (load_file(r / name / "export" / "model.safetensors") for r in (root, ref_root))
        assert ours.keys() == reference.keys() and not any("lora_" in k for k in ours)
        for key in reference:
            torch.testing.assert_close(ours[key], reference[key], atol=2e-6, rtol=1e-4, msg=f"{name}: {key}")
    adapter = root / "lora_adapter" / "export"
    assert (adapter / "adapter_config.json").exists() and not (adapter / "model.safetensors").exists()
    assert any("lora_" in k for k in load_file(adapter / "adapter_model.safetensors"))


def test_both_checkpoint_forms_resume(runs):
    """A folder of shards and a single full file each resume into the steps the uninterrupted run took."""
    sharded, _, _, _ = runs
    uninterrupted = losses(sharded["trd"])
    for name in ("trd_resumed", "trd_full_resumed"):
        assert sorted(losses(sharded[name])) == [3, 4], name
        assert losses(sharded[name]) == pytest.approx({s: uninterrupted[s] for s in (3, 4)}, rel=1e-5), name


def test_checkpoints_leave_the_frozen_teacher_out(runs):
    _, single, root, _ = runs
    assert (root / "trd" / "step=2.ckpt").is_dir()
    keys = FileSystemReader(root / "trd" / "step=2.ckpt").read_metadata().state_dict_metadata
    assert any(k.startswith("state_dict.student.") for k in keys)
    assert not any("teacher" in k for k in keys)
    full = torch.load(root / "trd_full" / "step=2.ckpt", weights_only=False)
    assert not any(k.startswith("teacher.") for k in full["state_dict"])
    # One optimizer state per trainable student parameter, as one process has.
    assert len(full["optimizer_states"][0]["state"]) == single["trd"]["facts"]["optimizer_states"]


def test_both_models_are_sharded_and_only_the_student_is_optimized(runs):
    sharded, single, _, _ = runs
    facts = sharded["trd"]["facts"]
    assert facts["student_sharded"] and facts["teacher_sharded"]
    assert facts["optimizer_only_student"] and facts["optimizer_states"] == single["trd"]["facts"]["optimizer_states"]
    assert sharded["trd_full"]["facts"]["checkpointed_layers"] and not facts["checkpointed_layers"]
    # Validation (greedy generation by the sharded student) ran and was scored.
    assert 0.0 <= sharded["trd_full"]["facts"]["val_accuracy"] <= 1.0


def test_ema_teacher_is_sharded_trained_and_resumed(runs):
    """The EMA self-teacher is sharded like the student, follows it after each step, and is part of the checkpoint."""
    sharded, single, root, _ = runs
    assert sharded["ema"]["facts"]["teacher_sharded"]
    assert losses(sharded["ema"]) == pytest.approx(losses(single["ema"]), rel=1e-4, abs=1e-7)
    keys = FileSystemReader(root / "ema" / "step=2.ckpt").read_metadata().state_dict_metadata
    assert any(k.startswith("state_dict.teacher.") for k in keys)
    assert losses(sharded["ema_resumed"]) == pytest.approx({3: losses(sharded["ema"])[3]}, rel=1e-5)


def test_mixed_precision_computes_in_bf16_over_fp32_shards(runs):
    sharded, single, _, _ = runs
    facts = sharded["bf16"]["facts"]
    assert facts["compute_dtype"] == "torch.bfloat16" and facts["weight_dtype"] == "torch.float32"
    assert single["trd"]["facts"]["compute_dtype"] == "torch.float32"
    # bf16 rounding only: the first step's rollouts come from the same weights.
    assert losses(sharded["bf16"])[1] == pytest.approx(losses(single["trd"])[1], rel=0.05)


def test_fsdp_config_builds_the_strategy(tmp_path):
    """The shipped FSDP2 preset instantiates its strategy (on two CPU processes here) without loading weights."""
    config = Path(__file__).parents[1] / "configs" / "qwen3_opd_fsdp.yaml"
    cli = cli_main(
        [
            "--config",
            str(config),
            "--trainer.accelerator=cpu",
            "--trainer.devices=2",
            "--trainer.strategy.init_args.process_group_backend=gloo",
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    strategy = cli.trainer.strategy
    assert isinstance(strategy, FSDP2Strategy)
    assert strategy.activation_checkpointing and strategy.mixed_precision and strategy._save_distributed_checkpoint
    assert cli.trainer.num_devices == 2 and cli.model.student is None
    assert cli.model.hparams.lora is None and not cli.model.hparams.gradient_checkpointing
