"""The demo world's property measurements: responses scored as the trainer scores them, every share against a
float64 recomputation written out here, and the command that records them in the world's world.json."""

from __future__ import annotations

import json
import random

import pytest
import torch

from trd_lightning.data.demo import decode, properties, world
from trd_lightning.data.demo.task import sample_problem
from trd_lightning.hf import load_causal_lm, load_tokenizer
from trd_lightning.prompts import to_prompt_ids


def sharpened(path: str, scale: float):
    """A tiny random model whose final norm is scaled up: sharp, uneven distributions instead of near-uniform."""
    model = load_causal_lm(path).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(scale)
    return model


def test_response_scoring_matches_a_plain_forward(tiny):
    """Responses are scored as the trainer scores them (left-padded context, right-padded response, batched); each
    row equals a forward of that row alone, unpadded."""
    tokenizer, model = load_tokenizer(tiny["student"]), load_causal_lm(tiny["student"]).eval()
    contexts = [to_prompt_ids(sample_problem(random.Random(s)).text, tokenizer, True) for s in (1, 3)]
    responses = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("4 * 8 = 2\n", "1 + 2")]
    batched = decode.response_logits(model, tokenizer, contexts, responses)
    for c, r, got in zip(contexts, responses, batched):
        with torch.no_grad():
            alone = model(torch.tensor([c + r])).logits[0, len(c) - 1 : len(c) + len(r) - 1]
        torch.testing.assert_close(got, alone.float(), atol=1e-4, rtol=1e-4)


def test_measured_properties_match_a_float64_recomputation(tiny):
    """The entropy share, the torn share after the first divergence and the KL shape, recomputed row by row from
    unpadded forwards in float64 with the formulas written out here."""
    tokenizer = load_tokenizer(tiny["student"])
    teacher, student = sharpened(tiny["teacher"], 60.0), sharpened(tiny["student"], 40.0)
    n, seed, budget = 6, 5, 10
    got = properties.measure_world(teacher, student, tokenizer, n=n, seed=seed, max_new_tokens=budget)
    rng = random.Random(seed)
    contexts = [to_prompt_ids(sample_problem(rng).text, tokenizer, True) for _ in range(n)]

    def logp(model, context, response):
        with torch.no_grad():
            logits = model(torch.tensor([context + response])).logits[0, len(context) - 1 : -1]
        return logits.double().log_softmax(-1)

    own = decode.sample(teacher, tokenizer, contexts, 1.0, 2 * budget, seed, "teacher").ids
    entropies = []
    for c, r in zip(contexts, own):
        lp = logp(teacher, c, r)
        entropies += (-(lp.exp() * lp).sum(-1)).tolist()
    assert got["teacher_uncertain"]["value"] == pytest.approx(sum(e >= 0.5 for e in entropies) / len(entropies))

    rollouts = decode.sample(student, tokenizer, contexts, 1.0, budget, seed, "student").ids
    kls, after = [], []
    for c, r in zip(contexts, rollouts):
        t, s_ = logp(teacher, c, r), logp(student, c, r)
        kls += (t.exp() * (t - s_)).sum(-1).tolist()
        token_p = [t[j, tok].exp().item() for j, tok in enumerate(r)]
        first = next((j for j, p in enumerate(token_p) if p < 0.05), None)
        top2 = t.exp().topk(2, dim=-1).values[:, 1]
        if first is not None:
            after += (top2[first:] > 0.2).tolist()
    assert got["teacher_torn"]["correct_rollouts"] == 0  # random models: every rollout is wrong, no control
    assert got["teacher_torn"]["control"] is None and got["teacher_torn"]["holds"] is False
    assert got["teacher_torn"]["value"] == pytest.approx(sum(after) / len(after))
    ordered = sorted(kls)
    assert got["kl_shape"]["median"] == pytest.approx(ordered[(len(ordered) - 1) // 2], rel=1e-4, abs=1e-6)
    share_above = sum(k > 0.1 for k in kls) / len(kls)
    assert got["kl_shape"]["share_above_0.1"] == pytest.approx(share_above)
    # The models are sharp enough that none of the checks above compares a degenerate 0 or 1.
    assert 0 < share_above < 1 and 0 < got["teacher_uncertain"]["value"] < 1


def test_the_command_records_the_properties_in_world_json(tiny, tmp_path, monkeypatch):
    """``python -m trd_lightning.data.demo.properties`` measures the world in use and adds its properties to its
    world.json, keeping what was there."""
    folder = tmp_path / "world"
    for name in ("teacher", "student"):
        load_causal_lm(tiny[name]).save_pretrained(folder / name)
        load_tokenizer(tiny["student"]).save_pretrained(folder / name)
    (folder / "world.json").write_text(json.dumps({"seed": 0}))
    monkeypatch.setattr(world, "world_dir", lambda: folder)
    measured = properties.measure_world
    monkeypatch.setattr(properties, "measure_world", lambda *a, **k: measured(*a, **k, n=3, max_new_tokens=6))
    properties.main()
    report = json.loads((folder / "world.json").read_text())
    assert report["seed"] == 0
    assert set(report["properties"]) >= {"teacher_uncertain", "teacher_torn", "kl_shape", "refiners_repair"}
    assert report["properties"]["measured_on"].startswith("3 fresh problems")
    assert not list(folder.glob("*.tmp"))
