"""The `trd` command: every shipped config instantiates, and a fit through the CLI leaves what users look at."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import CONFIGS, ON_CPU, demo_on_tiny, scalars
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoTokenizer

from trd_lightning import DistillationModule, OnPolicyDataModule, RefinementScheduler
from trd_lightning.cli import EXTRA_SUBCOMMANDS, SUBCOMMANDS, cli_main, main
from trd_lightning.data.sources import load_rows

OVERLAYS = {"trd.yaml", "demo_fsdp.yaml", "qwen3_opd_fsdp.yaml"}


def test_there_are_configs():
    names = {p.name for p in CONFIGS}
    assert {"demo.yaml", "demo_opsd.yaml", "qwen3_opd.yaml", "qwen3_opsd.yaml"} | OVERLAYS <= names


@pytest.mark.parametrize(
    ("base", "teacher_kind"), [("demo.yaml", "frozen"), ("demo_opsd.yaml", "shared"), ("qwen3_opd.yaml", "frozen")]
)
def test_trd_is_an_overlay_on_opd_and_opsd_configs(base, teacher_kind, tmp_path):
    """The overlay turns refinement on and adds the scheduler; everything else is the base config's."""
    plain = cli_main(["--config", str(CONFIGS[0].parent / base), *ON_CPU], run=False)
    trd = cli_main(
        ["--config", str(CONFIGS[0].parent / base), "--config", str(CONFIGS[0].parent / "trd.yaml"), *ON_CPU], run=False
    )
    assert not plain.datamodule.refine.enabled and trd.datamodule.refine.enabled
    assert trd.model.hparams.teacher_kind == teacher_kind
    # The base config's refine settings (template, budgets) carry over untouched.
    assert dataclasses.replace(trd.datamodule.refine, enabled=False) == plain.datamodule.refine
    assert trd.datamodule.rollout == plain.datamodule.rollout and trd.datamodule.prompt == plain.datamodule.prompt
    schedulers = [c for c in trd.trainer.callbacks if isinstance(c, RefinementScheduler)]
    assert len(schedulers) == 1 and not any(isinstance(c, RefinementScheduler) for c in plain.trainer.callbacks)

    def kinds(cli) -> list[str]:
        return [type(c).__name__ for c in cli.trainer.callbacks if not isinstance(c, RefinementScheduler)]

    assert kinds(trd) == kinds(plain)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_config_parses_and_instantiates(config, tmp_path):
    """Instantiating builds the module, DataModule and Trainer without loading weights or data."""
    cli = cli_main(["--config", str(config), *ON_CPU, f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert isinstance(cli.model, DistillationModule) and cli.model.student is None
    assert isinstance(cli.datamodule, OnPolicyDataModule) and cli.datamodule.train_rows is None
    assert cli.datamodule.hparams.tokenizer == cli.model.hparams.student
    if cli.model.hparams.teacher_kind == "shared":
        assert cli.datamodule.hparams.teacher_context == "privileged"


def test_later_config_overrides_earlier(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text("model:\n  beta: 0.5\ndata:\n  batch_size: 3\n")
    cli = cli_main(["--config", str(CONFIGS[0]), "--config", str(override), *ON_CPU], run=False)
    assert cli.model.hparams.beta == 0.5 and cli.datamodule.hparams.batch_size == 3


def test_print_config_and_help_run_as_a_program():
    out = subprocess.run(
        [sys.executable, "-m", "trd_lightning", "fit", "--config", "configs/demo.yaml", "--print_config"],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
        check=True,
    ).stdout
    assert "teacher: trd-demo/teacher" in out and "max_new_tokens" in out
    helped = subprocess.run(
        [sys.executable, "-m", "trd_lightning", "fit", "--help"], capture_output=True, text=True, check=True
    ).stdout
    # Constructor docstrings are the documentation of each option: the docstring's line follows the option's flag.
    flat = " ".join(helped.split())
    assert (
        "--model.micro_batch_size MICRO_BATCH_SIZE sequences per forward/backward; a memory knob only, it must divide "
        "the step's rollouts. (type: int, default: 8)"
    ) in flat


def test_fit_through_the_cli_logs_and_exports(tiny, tmp_path):
    root = tmp_path / "runs"
    cli_main(
        [
            "fit",
            *demo_on_tiny(tiny),
            f"--data.validation.data={tiny['validation']}",
            "--data.validation.split=train",
            "--data.rollout.max_new_tokens=12",
            "--data.validation.batch_size=8",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            f"--trainer.logger.init_args.save_dir={root}",
        ]
    )
    run = next(root.rglob("events.out.tfevents*")).parent
    events = EventAccumulator(str(run))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "val/accuracy", "train/lr", "rollout/response_length", "rollout/truncated_frac"} <= scalars
    assert {"perf/rollout_seconds", "perf/train_seconds", "perf/response_tokens_per_sec"} <= scalars
    assert [e.step for e in events.Scalars("val/accuracy")][0] == 0  # validated before the first step
    # The demo config's prefix-failure monitors measure at step 0.
    monitored = {"frag/coherence/y_o", "frag/grad_cosine/y_o", "teacher/bimodal_frac/y_o", "prefix/diverged_frac/y_o"}
    assert monitored <= scalars
    # ... and only there: a monitor's curve has a point where it measured, none at the steps in between.
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1]
    for tag in monitored:
        assert [e.step for e in events.Scalars(tag)] == [0], tag
    assert "teacher/token_kl/y_o" in events.Tags()["histograms"] and "prefix/rollout" in events.Tags()["images"]
    assert (run / "config.yaml").exists()

    export = run / "student"
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    ids = tokenizer("3 + 4", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    # The export is the trained student, not the starting one.
    start = AutoModelForCausalLM.from_pretrained(tiny["student"])
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), start.parameters()))


def test_validate_subcommand_logs_avg_and_pass_at_k(tiny, tmp_path):
    """`trd validate` samples k answers per prompt; pass@k, the chance that one of k is right, is at least avg@k."""
    cli = cli_main(
        [
            "validate",
            "--config",
            str(CONFIGS[0].parent / "demo.yaml"),
            *ON_CPU,
            f"--model.student={tiny['student']}",
            f"--model.teacher={tiny['teacher']}",
            f"--data.train_data={tiny['train']}",
            f"--data.validation.data={tiny['validation']}",
            "--data.validation.split=train",
            "--data.rollout.max_new_tokens=12",
            "--data.validation.samples=4",
            "--data.validation.temperature=1.0",
            "--data.validation.batch_size=8",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    metrics = cli.trainer.callback_metrics
    assert {"val/accuracy", "val/avg@4", "val/pass@4", "val/response_length"} <= set(metrics)
    assert float(metrics["val/avg@4"]) == pytest.approx(float(metrics["val/accuracy"]))
    assert float(metrics["val/pass@4"]) >= float(metrics["val/avg@4"])


def test_test_subcommand_evaluates_the_test_split_with_the_validation_metrics(tiny, tmp_path):
    """`trd test` runs validation's metrics on data.validation.test_split: the demo world's 512 test problems, each
    answered greedily, so its answers are those `trd validate` gives the same split."""
    common = [
        "--config",
        str(CONFIGS[0].parent / "demo.yaml"),
        *ON_CPU,
        "--data.validation.max_prompts=16",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]
    tested = cli_main(["test", *common, "--data.validation.test_split=test"])
    data = tested.datamodule
    assert len(data.test_rows) == 16 and data.val_rows is None
    assert data.test_rows[0]["problem"] == load_rows("trd-demo", "test")[0]["problem"]
    metrics = {k: float(v) for k, v in tested.trainer.callback_metrics.items()}
    assert {"test/accuracy", "test/avg@1", "test/pass@1", "test/response_length"} <= set(metrics)
    validated = cli_main(["validate", *common, "--data.validation.split=test"])
    again = {k.replace("val/", "test/"): float(v) for k, v in validated.trainer.callback_metrics.items()}
    assert metrics == pytest.approx({k: again[k] for k in metrics})
    with pytest.raises(ValueError, match="data.validation.test_split"):
        cli_main(["test", *common])


def test_the_installed_command_exits_zero(tiny, tmp_path):
    """The console entry point returns None, so the shell sees exit code 0 after a successful run."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from trd_lightning.cli import main; sys.exit(main())",
            "fit",
            *demo_on_tiny(tiny),
            "--data.validation.split=null",
            "--data.rollout.max_new_tokens=8",
            "--trainer.max_steps=1",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert done.returncode == 0, done.stderr[-2000:]


EVAL_SCHEMAS = {
    # Each benchmark config against a local file with the columns its hub card lists (no download).
    "aime24.yaml": (
        [
            {
                "id": i,
                "problem": f"AIME problem {i}",
                "solution": "...",
                "answer": str(100 + i),
                "url": "u",
                "year": "2024",
            }
            for i in range(3)
        ],
        ["100", "101", "102"],
    ),
    "math500.yaml": (
        [
            {
                "problem": f"MATH problem {i}",
                "solution": "...",
                "answer": f"\\frac{{{i}}}{{2}}",
                "subject": "Algebra",
                "level": 3,
                "unique_id": f"test/{i}.json",
            }
            for i in range(3)
        ],
        ["\\frac{0}{2}", "\\frac{1}{2}", "\\frac{2}{2}"],
    ),
    "aime25.yaml": (
        [{"problem": f"AIME 2025 problem {i}", "answer": str(70 + i), "id": str(i)} for i in range(3)],
        ["70", "71", "72"],
    ),
    "amc23.yaml": (
        # float64 answers, as some copies of AMC23 store them: whole numbers come back as integers
        [{"question": f"AMC problem {i}", "answer": a} for i, a in enumerate([27.0, 0.5, 3.0])],
        ["27", "0.5", "3"],
    ),
    "gsm8k.yaml": (
        [
            {
                "question": f"Tom has {i} apples...",
                "answer": f"He has {i} + 1 = <<{i}+1={i + 1}>>{i + 1}.\n#### {i + 1}",
            }
            for i in range(3)
        ],
        ["1", "2", "3"],
    ),
}


def validate_with_eval_config(tiny, tmp_path, name: str, rows: list[dict], *overrides: str):
    """``trd validate`` of the tiny models with ``configs/eval/NAME`` on a local parquet file of ``rows``."""
    from datasets import Dataset

    local = tmp_path / "bench.parquet"
    Dataset.from_list(rows).to_parquet(str(local))
    return cli_main(
        [
            "validate",
            *demo_on_tiny(tiny),
            "--config",
            str(CONFIGS[0].parent / "eval" / name),
            f"--data.validation.data={local}",
            "--data.rollout.max_new_tokens=6",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            *overrides,
        ]
    )


@pytest.mark.parametrize("name", sorted(EVAL_SCHEMAS))
def test_benchmark_configs_map_their_columns(name, tiny, tmp_path):
    rows, answers = EVAL_SCHEMAS[name]
    cli = validate_with_eval_config(tiny, tmp_path, name, rows)
    data = cli.datamodule
    assert [r["answer"] for r in data.val_rows] == answers
    problem_column = data.validation.problem_column
    assert [r["problem"] for r in data.val_rows] == [r[problem_column] for r in rows]
    k = data.validation.samples
    assert {f"val/avg@{k}", f"val/pass@{k}"} <= set(cli.trainer.callback_metrics)


# ------------------------------------------------------------------ what the command offers


def help_text(capsys, *args: str) -> str:
    """What ``trd ARGS --help`` prints, whitespace-normalised (the help wraps its lines)."""
    with pytest.raises(SystemExit) as done:
        cli_main([*args, "--help"])
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_help_lists_each_subcommand_with_its_help(capsys):
    listed = help_text(capsys).split("Available subcommands:")[1]
    for name, text in {**SUBCOMMANDS, **{k: v[1] for k, v in EXTRA_SUBCOMMANDS.items()}}.items():
        assert f"{name} {text}" in listed
    assert {"fit", "validate", "test", "refine"} <= set(SUBCOMMANDS) | set(EXTRA_SUBCOMMANDS)
    assert "predict" not in listed
    with pytest.raises(SystemExit) as refused:
        main(["predict", "--config", str(CONFIGS[0])])
    assert refused.value.code == 2 and "invalid choice: 'predict'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["fit", "validate", "test", "refine"])
def test_each_subcommand_has_its_own_help(name, capsys):
    helped = help_text(capsys, name)
    description = SUBCOMMANDS[name] if name in SUBCOMMANDS else EXTRA_SUBCOMMANDS[name][1]
    assert description in helped
    assert ("--output OUTPUT" in helped) if name == "refine" else ("--model.student STUDENT" in helped)


def record_call(argv):
    record_call.seen.append(argv)
    return "ran"


record_call.seen = []


def test_an_extra_subcommand_is_one_entry_of_the_table(monkeypatch, capsys):
    """What adding `serve` takes: one line naming its function, which gets the arguments after the name."""
    monkeypatch.setitem(EXTRA_SUBCOMMANDS, "probe", (f"{__name__}:record_call", "A subcommand added for this test."))
    assert cli_main(["probe", "--port", "8000"]) == "ran"
    assert record_call.seen[-1] == ["--port", "8000"]
    assert "probe A subcommand added for this test." in help_text(capsys)


# ------------------------------------------------------------------ one run, one folder


def test_resuming_from_a_run_continues_its_folder_and_curves(tiny, tmp_path):
    root = tmp_path / "runs"
    checkpoints = tmp_path / "checkpoints.yaml"
    checkpoints.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {every_n_train_steps: 2, save_top_k: -1}\n"
    )
    args = [
        "fit",
        *demo_on_tiny(tiny),
        "--config",
        str(checkpoints),
        "--data.validation.split=null",
        "--data.rollout.max_new_tokens=8",
        "--trainer.max_steps=4",
        f"--trainer.logger.init_args.save_dir={root}",
    ]
    cli_main(args)
    run = root / "demo_opd" / "version_0"
    first = EventAccumulator(str(run))
    first.Reload()
    losses = {e.step: e.value for e in first.Scalars("train/loss")}
    assert sorted(losses) == [0, 1, 2, 3]  # four steps, logged at steps 0..3
    # Resume from the step-2 checkpoint, as after a crash: the run's steps 2 and 3 are logged again.
    resumed = cli_main([*args, f"--ckpt_path={run / 'checkpoints' / 'epoch=0-step=2.ckpt'}"])
    assert resumed.trainer.logger.log_dir == str(run)
    assert sorted(p.name for p in (root / "demo_opd").iterdir()) == ["version_0"]
    assert len(list(run.glob("events.out.tfevents*"))) == 2
    assert resumed.trainer.progress_bar_callback.train_progress_bar.initial == 2  # the bar starts at the checkpoint
    curves = EventAccumulator(str(run))
    curves.Reload()
    steps = [e.step for e in curves.Scalars("train/loss")]
    assert steps == [0, 1, 2, 3]  # one curve: the first run's steps 2 and 3 are replaced, not doubled
    # Resuming is exact, so the replaced points equal the first run's.
    assert [e.value for e in curves.Scalars("train/loss")] == pytest.approx([losses[s] for s in steps], rel=1e-5)


def test_a_checkpoint_from_elsewhere_starts_a_new_version(tiny, tmp_path):
    root = tmp_path / "runs"
    args = [
        "fit",
        *demo_on_tiny(tiny),
        "--data.validation.split=null",
        "--data.rollout.max_new_tokens=8",
        "--trainer.max_steps=1",
        f"--trainer.logger.init_args.save_dir={root}",
    ]
    cli_main(args)
    ckpt = tmp_path / "elsewhere.ckpt"
    next(root.rglob("*.ckpt")).rename(ckpt)
    resumed = cli_main([*args.copy()[:-2], "--trainer.max_steps=2", args[-1], f"--ckpt_path={ckpt}"])
    assert Path(resumed.trainer.logger.log_dir).name == "version_1"


# ------------------------------------------------------------------ the README quick start's console


def test_quick_start_console_is_clean_and_ends_with_a_summary(tmp_path):
    """`trd fit --config configs/demo.yaml`, cut to 3 steps: every Python warning it shows is recorded."""
    record = tmp_path / "warnings.txt"
    program = (
        "import sys, warnings\n"
        "shown = warnings.showwarning\n"
        "def record(message, category, filename, lineno, file=None, line=None):\n"
        f"    with open({str(record)!r}, 'a') as out:\n"
        "        out.write(f'{category.__name__}: {message}\\n')\n"
        "    shown(message, category, filename, lineno, file, line)\n"
        "warnings.showwarning = record\n"
        "from trd_lightning.cli import main\n"
        "main()\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            program,
            "fit",
            "--config",
            "configs/demo.yaml",
            "--trainer.max_steps",
            "3",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    console = (done.stdout + done.stderr).replace("\r", "\n")
    warned = record.read_text().splitlines() if record.exists() else []
    assert warned == []
    assert [line for line in console.splitlines() if re.search("(?i)warn", line)] == []
    assert re.search(r"Step: 100%\|[^|]*\| 3/3 \[.*loss=[\d.e-]+, rollout=\d+%, val/accuracy=[\d.]+\]", console)
    run = tmp_path / "runs" / "demo_opd" / "version_0"
    assert "[trd] fit done: 3 optimizer steps in " in console
    # Validated before training and, though the run is shorter than the validation interval, after it.
    assert re.search(r"  val/accuracy: [\d.]+ before training -> [\d.]+ after 3 steps\n", console)
    assert [step for step, _ in scalars(run)["val/accuracy"]] == [0, 3]
    assert f"  student exported to {run / 'student'}\n" in console
    assert f"  curves: tensorboard --logdir {run}\n" in console
