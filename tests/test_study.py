"""The study script reuses a finished run only when it was made on the same demo world with the same settings."""

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

from trd_lightning.data.demo import world

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_world(tmp_path, monkeypatch):
    folder = tmp_path / "world"
    for name in ("world.json", "teacher/model.safetensors", "student/model.safetensors"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(name.encode())
    monkeypatch.setattr(world, "world_dir", lambda: folder)
    return folder


def settings(**changes) -> argparse.Namespace:
    return argparse.Namespace(**{"steps": 200, "val_every": 25, "samples": 4, **changes})


def test_a_curve_is_reused_only_on_the_same_world_and_settings(study, fake_world, tmp_path):
    curve = tmp_path / "opd_seed0.json"
    assert not study.finished(curve, study.fingerprint(settings()))  # nothing there yet
    curve.write_text(json.dumps({"method": "OPD", "seed": 0, "curve": []}))
    assert not study.finished(curve, study.fingerprint(settings()))  # written before curves kept their making
    curve.write_text(json.dumps({"method": "OPD", "made_with": study.fingerprint(settings())}))
    assert study.finished(curve, study.fingerprint(settings()))
    for changed in (settings(steps=300), settings(val_every=50), settings(samples=8)):
        assert not study.finished(curve, study.fingerprint(changed))
    (fake_world / "student" / "model.safetensors").write_bytes(b"other weights")
    assert not study.finished(curve, study.fingerprint(settings()))  # another demo world
