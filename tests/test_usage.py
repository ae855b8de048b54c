"""What the `trd` command says: a mistake on one line (the nearest valid option, --debug for the traceback), the
options it does not offer, and `trd serve` announcing itself once it answers."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import CONFIGS, REPO, demo_on_tiny, trd
from test_cli import help_text

from trd_lightning.cli import main


def mistake(capsys, *args: str) -> str:
    """What ``trd ARGS`` prints for a user's mistake: one line on stderr, exit code 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(list(args))
    err = capsys.readouterr().err
    assert done.value.code == 2, err
    # The last line is the message (progress bars of `datasets` may come before it); no traceback.
    last = err.rstrip("\n").split("\n")[-1]
    assert "Traceback" not in err and last.startswith("trd: error: "), err
    return last.removeprefix("trd: error: ")


def test_a_typo_in_an_option_is_one_line_with_the_nearest_name_and_debug_shows_the_traceback(tmp_path):
    done = trd("fit", "--config", "configs/demo.yaml", "--model.betta", "0.5")
    assert done.returncode == 2
    assert done.stderr == "trd: error: unknown option --model.betta: did you mean --model.beta?\n"
    shown = trd("fit", "--config", "configs/demo.yaml", "--model.betta", "0.5", env={"TRD_DEBUG": "1"})
    assert shown.returncode != 0 and "Traceback (most recent call last)" in shown.stderr
    assert "unknown option --model.betta: did you mean --model.beta?" in shown.stderr


def test_a_missing_data_file_is_one_line_and_leaves_no_empty_run(tmp_path):
    done = trd("fit", "--config", str(REPO / "configs" / "demo.yaml"), "--data.train_data=nope.jsonl", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines()[-1] == "trd: error: data.train_data: dataset file nope.jsonl does not exist."
    assert "Traceback" not in done.stderr
    assert list(tmp_path.iterdir()) == []  # no runs/demo_opd/version_0 holding an empty event file


def test_debug_flag_reraises(capsys):
    from trd_lightning.usage import UsageError

    with pytest.raises(UsageError, match="did you mean --model.beta"):
        main(["fit", "--config", str(CONFIGS[0]), "--model.betta", "0.5", "--debug"])


def test_optimizer_options_are_not_offered_and_are_refused_with_the_working_ones(capsys):
    helped = help_text(capsys, "fit")
    assert "--optimizer" not in helped and "--lr_scheduler" not in helped and "--model.lr LR" in helped
    said = mistake(capsys, "fit", "--config", str(CONFIGS[0]), "--optimizer", "SGD", "--optimizer.lr", "0.5")
    assert said.startswith("--optimizer is not an option of trd:") and "--model.lr" in said
    said = mistake(capsys, "fit", "--config", str(CONFIGS[0]), "--lr_scheduler", "StepLR")
    assert said.startswith("--lr_scheduler is not an option of trd:") and "--model.warmup_ratio" in said


def test_each_mistake_of_the_issue_is_one_line(tiny, tmp_path, capsys, no_weights, monkeypatch):
    base = [*demo_on_tiny(tiny), "--data.validation.split=null", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    fit = ["fit", *base]
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  betta: 0.5\n")
    assert mistake(capsys, *fit, "--config", str(typo)) == "unknown config key model.betta: did you mean model.beta?"
    # checked before any weights load (no_weights)
    said = mistake(capsys, *fit, "--ckpt_path", "/nope/last.ckpt")
    assert said == "--ckpt_path /nope/last.ckpt does not exist: name a checkpoint file (or folder of shards)."
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1 + 1", "answer": "2"}\n{"problem": oops}\n')
    assert "line 2" in mistake(capsys, *fit, f"--data.train_data={bad}")
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text('{"problem": 3, "answer": "2"}\n')
    said = mistake(capsys, *fit, f"--data.train_data={numbers}")
    assert "the problem column 'problem' holds int64 values, not text" in said
    assert "is not a valid regular expression" in mistake(capsys, *fit, "--data.answer_pattern=(")
    said = mistake(capsys, *fit, "--data.refine.enabled=true", "--data.refine.max_prompt_length=1000")
    assert "data.refine.max_prompt_length plus the refiner's new tokens" in said
    said = mistake(capsys, *fit, "--data.refine.enabled=true", f"--data.refine.offline_round={tmp_path / 'nope'}")
    assert said.startswith(f"data.refine.offline_round: {tmp_path / 'nope'} is not a refinement round")
    # An eval config run offline (conftest sets HF_HUB_OFFLINE=1): the option named, no empty run left.
    said = mistake(capsys, "validate", *base, "--config", str(CONFIGS[0].parent / "eval" / "gsm8k.yaml"))
    assert said.startswith("data.validation.data='openai/gsm8k' is no local file or folder, and the hub could not")
    assert not (tmp_path / "demo_opd").exists(), list((tmp_path / "demo_opd").rglob("*"))
    said = mistake(capsys, "fit", "--config", str(CONFIGS[0].parent / "trd.yaml"))
    assert said.startswith(f"{CONFIGS[0].parent / 'trd.yaml'} is an overlay") and "--config configs/demo.yaml" in said
    target = tmp_path / "a_file"
    target.write_text("")
    said = mistake(capsys, "refine", "--output", str(target), *base[:-1], "--data.refine.enabled=true")
    assert said.startswith(f"--output {target} is a file")


def test_trd_serve_says_it_is_ready_once_it_answers(tiny):
    import os

    import httpx
    from fixtures.serving import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "trd_lightning", "serve", "--model", tiny["student"], "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line = server.stdout.readline()  # the first line it prints
        assert line == f"trd serve: {tiny['student']} ready on http://127.0.0.1:{port} (cpu, float32)\n"
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200  # answering already
    finally:
        server.terminate()
        server.wait(timeout=30)
