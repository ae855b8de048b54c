"""A run's records stay true: validation and test runs in folders of their own, and a run name per variant."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import CONFIGS, ON_CPU, demo_on_tiny, scalars, trd

from trd_lightning.cli import cli_main


def test_a_validation_of_a_run_gets_its_own_folder_and_leaves_the_run_as_it_was(tiny, tmp_path):
    root = tmp_path / "runs"
    checkpoints = tmp_path / "checkpoints.yaml"
    checkpoints.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {every_n_train_steps: 2, save_top_k: -1}\n"
    )
    common = [
        *demo_on_tiny(tiny),
        f"--data.validation.data={tiny['validation']}",
        "--data.validation.split=train",
        "--data.validation.batch_size=16",
        "--data.rollout.max_new_tokens=8",
        f"--trainer.logger.init_args.save_dir={root}",
    ]
    fitted = trd("fit", *common, "--config", str(checkpoints), "--trainer.max_steps=2")
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    run = root / "demo_opd" / "version_0"
    before = scalars(run)
    config = (run / "config.yaml").read_text()
    assert "max_steps: 2" in config
    ckpt = run / "checkpoints" / "epoch=0-step=2.ckpt"
    validated = trd("validate", *common, f"--ckpt_path={ckpt}")
    assert validated.returncode == 0, validated.stderr[-3000:]
    # The run's own records are untouched: its curves and its config.
    assert scalars(run) == before and (run / "config.yaml").read_text() == config
    assert sorted(p.name for p in (root / "demo_opd").iterdir()) == ["version_0", "version_0-validate"]
    own = root / "demo_opd" / "version_0-validate"
    assert [step for step, _ in scalars(own)["val/accuracy"]] == [0]
    assert f"ckpt_path: {ckpt}" in (own / "config.yaml").read_text()
    # A second validation and a test of the same run each get the next folder beside it.
    cli_main(["validate", *common, f"--ckpt_path={ckpt}"])
    cli_main(["test", *common, "--data.validation.test_split=train", f"--ckpt_path={ckpt}"])
    assert sorted(p.name for p in (root / "demo_opd").iterdir()) == [
        "version_0",
        "version_0-test",
        "version_0-validate",
        "version_0-validate-1",
    ]
    assert "test/accuracy" in scalars(root / "demo_opd" / "version_0-test")
    assert scalars(run) == before
    # Without a checkpoint of a run, a validation is no training run either.
    cli_main(["validate", *common])
    assert (root / "demo_opd" / "validate_0" / "config.yaml").exists()


# ------------------------------------------------------------------ run names tell the variants apart


@pytest.mark.parametrize(
    ("stack", "extra", "name"),
    [
        (["demo.yaml"], [], "demo_opd"),
        (["demo.yaml", "trd.yaml"], [], "demo_trd_opd"),
        (["demo.yaml", "trd.yaml"], ["--data.refine.offline_round=runs/refined"], "demo_trd_opd_offline"),
        (["demo.yaml", "trd.yaml", "demo_trd_served.yaml"], [], "demo_trd_opd_served"),
        (["demo.yaml", "demo_rollouts_served.yaml"], [], "demo_opd_served_overlap"),
        (["demo.yaml", "demo_rollouts_served.yaml"], ["--data.rollout.max_staleness=0"], "demo_opd_served"),
        (["demo_opsd.yaml"], [], "demo_opsd"),
        (["demo_opsd.yaml", "trd.yaml"], [], "demo_trd_opsd"),
        (["demo.yaml", "trd.yaml", "demo_fsdp.yaml"], [], "demo_trd_opd_fsdp"),
        (["qwen3_opd.yaml", "trd.yaml", "qwen3_trd_opd_served.yaml"], [], "qwen3_trd_opd_served"),
        (["demo.yaml", "trd.yaml"], ["--trainer.logger.init_args.name=mine"], "mine"),
    ],
)
def test_each_variant_has_its_own_run_name(stack, extra, name, tmp_path):
    configs = [arg for config in stack for arg in ("--config", str(CONFIGS[0].parent / config))]
    save_dir = f"--trainer.logger.init_args.save_dir={tmp_path}"
    cli = cli_main([*configs, *ON_CPU, save_dir, *extra], run=False)
    assert Path(cli.trainer.logger.log_dir) == tmp_path / name / "version_0"
