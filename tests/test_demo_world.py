"""The embedded demo world: shipped models that behave as promised, and a build that reproduces itself."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch
import yaml

from trd_lightning.data.demo import build as demo_build
from trd_lightning.data.demo import world
from trd_lightning.data.demo.task import TEMPLATES, Problem, flawed_solution, sample_problem
from trd_lightning.hf import load_causal_lm, load_tokenizer
from trd_lightning.prompts import render, to_prompt_ids
from trd_lightning.verify import is_correct

CONFIGS = Path(__file__).parents[1] / "configs"


def greedy_accuracy(name: str, template: str, n: int = 64, seed: int = 777) -> float:
    """Accuracy of a demo model on fresh problems, through the same loading path users take."""
    tokenizer, model = load_tokenizer(world.resolve(name)), load_causal_lm(world.resolve(name)).eval()
    rng = random.Random(seed)
    problems = [sample_problem(rng) for _ in range(n)]
    texts = [render(template, problem=p.text, solution=p.solution(), initial=flawed_solution(p, rng)) for p in problems]
    batch = tokenizer.pad({"input_ids": [to_prompt_ids(t, tokenizer, True) for t in texts]}, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=48, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    replies = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return sum(is_correct(r, p.answer) for r, p in zip(replies, problems)) / n


def test_task_semantics_by_hand():
    p = Problem(start=6, steps=(("+", 4), ("*", 7), ("-", 4), ("-", 5)))
    assert p.values() == [0, 0, 6, 1]  # 10 -> 0, 0*7 -> 0, 0-4 -> -4 -> 6, 6-5 -> 1
    assert p.solution().splitlines() == ["6 + 4 = 0", "0 * 7 = 0", "0 - 4 = 6", "6 - 5 = 1", "Answer: \\boxed{1}"]
    flawed = flawed_solution(p, random.Random(0))
    assert flawed != p.solution() and flawed.count("\n") == p.solution().count("\n")


def test_teacher_is_competent_and_student_clearly_weaker():
    teacher = greedy_accuracy("trd-demo/teacher", TEMPLATES["student"])
    student = greedy_accuracy("trd-demo/student", TEMPLATES["student"])
    assert teacher >= 0.9
    assert student <= teacher - 0.25


def test_models_follow_the_privileged_and_refine_formats():
    # OPSD needs the student to use a reference it is shown; TRD needs the refiners to repair a draft.
    assert greedy_accuracy("trd-demo/student", TEMPLATES["privileged"]) >= 0.8
    assert greedy_accuracy("trd-demo/teacher", TEMPLATES["refine_opd"]) >= 0.9


@pytest.mark.parametrize("config", ["demo.yaml", "demo_opsd.yaml"])
def test_demo_configs_use_the_templates_the_demo_models_learnt(config):
    data = yaml.safe_load((CONFIGS / config).read_text())["data"]
    assert data["prompt"]["student_template"] == TEMPLATES["student"]
    privileged = data["teacher_context"] == "privileged"
    if privileged:
        assert data["prompt"]["privileged_template"] == TEMPLATES["privileged"]
    assert data["refine"]["template"] == TEMPLATES["refine_opsd" if privileged else "refine_opd"]


def test_unknown_demo_model_is_named():
    with pytest.raises(ValueError, match="trd-demo/teacher"):
        world.resolve("trd-demo/professor")
    assert world.resolve("Qwen/Qwen3-8B") == "Qwen/Qwen3-8B"


def test_build_into_the_cache_is_reproducible(tmp_path, monkeypatch):
    """Without shipped weights the world is built on first use into the cache, atomically; a second build
    with the same seed gives the same weights."""
    tiny = {
        "hidden_size": 16,
        "layers": 1,
        "heads": 4,
        "kv_heads": 2,
        "intermediate_size": 32,
        "steps": 3,
        "batch_size": 4,
    }
    monkeypatch.setattr(demo_build, "TEACHER", dataclasses.replace(demo_build.TEACHER, **tiny))
    monkeypatch.setattr(demo_build, "STUDENT", dataclasses.replace(demo_build.STUDENT, **tiny))
    monkeypatch.setattr(demo_build, "accuracy", lambda *a, **k: 0.0)
    monkeypatch.setattr(world, "_SHIPPED", tmp_path / "nothing-shipped")
    monkeypatch.setenv("TRD_DEMO_CACHE", str(tmp_path / "cache"))
    built = world.world_dir()
    assert built == tmp_path / "cache" and (built / "world.json").exists()
    assert not list(tmp_path.glob(".cache.tmp-*"))
    first = load_causal_lm(world.resolve("trd-demo/teacher"))
    demo_build.build(tmp_path / "again")
    second = load_causal_lm(str(tmp_path / "again" / "teacher"))
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
