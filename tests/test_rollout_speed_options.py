"""Generation speed options of ``generate``: the static key/value cache and compiled decoding give the dynamic
cache's rollouts, and they are reachable from the DataModule's configuration (with ``decoder: generate``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from jsonargparse import ArgumentParser

from trd_lightning.data.datamodule import OnPolicyDataModule
from trd_lightning.hf import load_causal_lm, load_tokenizer
from trd_lightning.rollout.assemble import pad_left
from trd_lightning.rollout.generation import SamplingConfig, sample


@pytest.fixture(scope="module")
def prompts(tiny):
    """Left-padded prompts of different lengths from the tiny training file, and the tokenizer."""
    tok = load_tokenizer(tiny["student"])
    problems = [json.loads(line)["problem"] for line in Path(tiny["train"]).read_text().splitlines()[:4]]
    rows = [tok(p, add_special_tokens=False)["input_ids"][: 6 + 3 * i] for i, p in enumerate(problems)]
    ids, mask = pad_left(rows, tok.pad_token_id)
    assert len(set(mask.sum(-1).tolist())) > 1  # padding is exercised
    return tok, ids, mask


GENERATE = {"decoder": "generate"}  # the static cache and compilation are generate's


def rollout(model, prompts, sampling: SamplingConfig, with_logprobs: bool = False):
    tok, ids, mask = prompts
    torch.manual_seed(0)
    return sample(model, ids, mask, sampling, [tok.eos_token_id], tok.pad_token_id, with_logprobs)


def assert_same_rollouts(actual, expected) -> None:
    assert torch.equal(actual.ids, expected.ids)
    assert torch.equal(actual.mask, expected.mask)
    assert torch.equal(actual.truncated, expected.truncated)
    if expected.behavior_logprobs is not None:
        torch.testing.assert_close(actual.behavior_logprobs, expected.behavior_logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_static_cache_gives_the_default_rollouts(tiny, prompts, temperature):
    model = load_causal_lm(tiny["student"]).eval()
    default = rollout(model, prompts, SamplingConfig(max_new_tokens=12, temperature=temperature, **GENERATE), True)
    static = SamplingConfig(max_new_tokens=12, temperature=temperature, cache="static", **GENERATE)
    static = rollout(model, prompts, static, True)
    assert default.ids.shape == (4, 12)
    assert_same_rollouts(static, default)


@pytest.mark.slow
def test_compiled_decoding_gives_the_default_greedy_rollouts(tiny, prompts):
    model = load_causal_lm(tiny["student"]).eval()
    default = rollout(model, prompts, SamplingConfig(max_new_tokens=12, temperature=0.0, **GENERATE), True)
    traced = []
    # torch.compile runs Python hooks only while it traces, so a True here shows the decoding step was compiled.
    model.lm_head.register_forward_hook(lambda *_: traced.append(torch.compiler.is_compiling()))
    compiled = SamplingConfig(max_new_tokens=12, temperature=0.0, cache="static", compile=True, **GENERATE)
    for _ in range(2):  # the second call runs the compiled code without tracing again
        assert_same_rollouts(rollout(model, prompts, compiled, True), default)
    assert any(traced)


def test_sampling_config_speed_options():
    assert SamplingConfig(temperature=0.0, cache="static", **GENERATE).generate_kwargs() == {
        "do_sample": False,
        "max_new_tokens": 256,
        "cache_implementation": "static",
        "disable_compile": True,
    }
    compiled = SamplingConfig(cache="static", compile=True, **GENERATE).generate_kwargs()
    assert compiled["cache_implementation"] == "static" and "disable_compile" not in compiled
    assert compiled["compile_config"]._compile_all_devices
    with pytest.raises(ValueError, match="static cache"):
        SamplingConfig(compile=True, **GENERATE)
    with pytest.raises(ValueError, match="data.decoder: generate"):  # the default native decoder has neither
        SamplingConfig(cache="static")
    with pytest.raises(ValueError, match="cache must be"):
        SamplingConfig(cache="sliding")


def test_datamodule_passes_speed_options_to_every_generation(tiny):
    default = OnPolicyDataModule(tokenizer=tiny["student"], train_data=tiny["train"])
    for sampling in (default.sampling, default.val_sampling, default.refine_sampling):
        assert (sampling.cache, sampling.compile) == ("dynamic", False)
    fast = OnPolicyDataModule(
        tokenizer=tiny["student"],
        train_data=tiny["train"],
        generation_cache="static",
        compile_generation=True,
        decoder="generate",
    )
    for sampling in (fast.sampling, fast.val_sampling, fast.refine_sampling):
        assert (sampling.cache, sampling.compile) == ("static", True)
    with pytest.raises(ValueError, match="generation_cache: static"):
        OnPolicyDataModule(tokenizer=tiny["student"], train_data=tiny["train"], compile_generation=True, **GENERATE)


def test_speed_options_parse_from_yaml():
    parser = ArgumentParser()
    parser.add_class_arguments(OnPolicyDataModule, "data")
    cfg = parser.parse_string("data:\n  generation_cache: static\n  compile_generation: true\n")
    assert (cfg.data.generation_cache, cfg.data.compile_generation) == ("static", True)
    with pytest.raises(SystemExit):
        parser.parse_string("data:\n  generation_cache: paged\n")
