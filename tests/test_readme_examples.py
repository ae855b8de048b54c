"""The README's own Python examples, run exactly as printed."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from helpers import REPO, readme_block, scalars


def test_the_readme_use_in_your_own_project_example_runs_as_printed(tmp_path):

    code = readme_block("## Use in your own Lightning project")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"val/accuracy after 4 steps: [\d.]+\n", done.stdout)
    run = tmp_path / "runs" / "my_trd_opd" / "version_0"
    curves = scalars(run)
    assert [step for step, _ in curves["val/accuracy"]] == [0, 4]  # before training, and after it
    assert [step for step, _ in curves["refine/accuracy_after"]] == [0, 1, 2, 3]
    assert [step for step, _ in curves["frag/coherence/y_r"]] == [0, 2]
    assert (run / "student" / "model.safetensors").exists()


def test_the_readme_code_reference_example_runs_as_printed(tmp_path):

    code = readme_block("### Writing a code reference")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["stdio passed", "call passed", "assert wrong_answer"]
