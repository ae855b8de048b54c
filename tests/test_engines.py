"""Generation engines: the native loop and ``generate`` draw the same rollouts for the same seeds, with the right
behaviour log-probs; the row cap leaves rollouts unchanged; every declared end token ends a rollout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from jsonargparse import ArgumentParser

from trd_lightning.data.datamodule import OnPolicyDataModule
from trd_lightning.data.options import RolloutOptions
from trd_lightning.hf import load_causal_lm, load_tokenizer
from trd_lightning.rollout.batch import Prompts
from trd_lightning.rollout.engines import EngineOptions, LocalEngine, end_token_ids
from trd_lightning.rollout.sampling import SamplingConfig
from trd_lightning.rollout.seeds import row_seeds

GENERATE = {"decoder": "generate"}  # the static cache and compilation are generate's


@pytest.fixture(scope="module")
def setup(tiny):
    """The tiny student, its tokenizer, and left-padded prompts of different lengths from the train file."""
    tok = load_tokenizer(tiny["student"])
    model = load_causal_lm(tiny["student"]).eval()
    problems = [json.loads(line)["problem"] for line in Path(tiny["train"]).read_text().splitlines()[:6]]
    rows = [tok(p, add_special_tokens=False)["input_ids"][: 4 + 3 * i] for i, p in enumerate(problems)]
    prompts = Prompts.from_lists(rows, tok.pad_token_id)
    assert len(set(prompts.mask.sum(-1).tolist())) > 1  # padding is exercised
    return tok, model, prompts


SEEDS = row_seeds(0, 3, "rollout", range(6))


def run(setup, sampling: SamplingConfig, seeds=SEEDS, eos=None, **options):
    tok, model, prompts = setup
    engine = LocalEngine(model, eos or [tok.eos_token_id], tok.pad_token_id, EngineOptions(**options))
    return engine.generate(prompts, sampling, list(seeds))


def reference_logprobs(model, prompts: Prompts, out, temperature: float, top_k: int = 0) -> torch.Tensor:
    """Independent reference: one forward over prompt + response, log-softmax of filtered logits / T per token."""
    full = torch.cat([prompts.ids, out.ids], 1)
    full_mask = torch.cat([prompts.mask, out.mask.long()], 1)
    with torch.no_grad():
        logits = model(full, attention_mask=full_mask, position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits
    width = out.ids.shape[1]
    scaled = logits[:, -width - 1 : -1].double() / (temperature or 1.0)
    if top_k:
        kth = scaled.topk(top_k, -1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return scaled.log_softmax(-1).gather(-1, out.ids[..., None])[..., 0]


def assert_same_rollouts(actual, expected) -> None:
    assert torch.equal(actual.ids, expected.ids)
    assert torch.equal(actual.mask, expected.mask)
    assert torch.equal(actual.truncated, expected.truncated)
    torch.testing.assert_close(actual.logprobs, expected.logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_native_and_generate_give_the_same_rollouts(setup, temperature):
    sampling = SamplingConfig(max_new_tokens=14, temperature=temperature)
    assert_same_rollouts(run(setup, sampling), run(setup, sampling, **GENERATE))


@pytest.mark.parametrize("top_k", [0, 5])
@pytest.mark.parametrize("decoder", ["native", "generate"])
def test_sampled_rollouts_carry_their_behaviour_logprobs(setup, top_k, decoder):
    tok, model, prompts = setup
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.9, top_k=top_k)
    out = run(setup, sampling, decoder=decoder)
    assert torch.equal(run(setup, sampling, decoder=decoder).ids, out.ids)  # seeded
    assert not torch.equal(run(setup, sampling, seeds=[s + 1 for s in SEEDS], decoder=decoder).ids, out.ids)
    reference = reference_logprobs(model, prompts, out, 0.9, top_k)
    assert torch.allclose(out.logprobs.double()[out.mask], reference[out.mask], atol=1e-4)


def test_greedy_logprobs_are_the_plain_distributions(setup):
    tok, model, prompts = setup
    out = run(setup, SamplingConfig(max_new_tokens=10, temperature=0.0))
    reference = reference_logprobs(model, prompts, out, 0.0)
    assert torch.allclose(out.logprobs.double()[out.mask], reference[out.mask], atol=1e-4)


@pytest.mark.parametrize("decoder", ["native", "generate"])
@pytest.mark.parametrize("max_rows", [1, 2, 4])
def test_capped_generation_gives_the_uncapped_rollouts(setup, decoder, max_rows):
    """Each row draws from its own seed, so chunks of 1, 2 or 4 rows (the last one short) change nothing."""
    tok = setup[0]
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0)
    # The random tiny model rarely draws its end token: make a token of one rollout an end token too, so that
    # rows end at different lengths and merging the chunks has padding to get right.
    eos = [tok.eos_token_id, run(setup, sampling).ids[0, 4].item()]
    whole = run(setup, sampling, eos=eos, decoder=decoder)
    capped = run(setup, sampling, eos=eos, decoder=decoder, max_rows=max_rows)
    assert len(set(whole.mask.sum(-1).tolist())) > 1
    assert_same_rollouts(capped, whole)


def test_a_row_draws_the_same_tokens_alone_or_among_others(setup):
    tok, model, prompts = setup
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0)
    whole = run(setup, sampling)
    engine = LocalEngine(model, [tok.eos_token_id], tok.pad_token_id, EngineOptions())
    alone = engine.generate(prompts.rows([3]), sampling, [SEEDS[3]])
    length = int(alone.mask.sum())
    assert torch.equal(alone.ids[0, :length], whole.ids[3, :length]) and int(whole.mask[3].sum()) == length


def test_min_new_tokens_holds_back_the_end_token(setup):
    tok, model, _ = setup
    model.generation_config.min_new_tokens = 9
    try:
        out = run(setup, SamplingConfig(max_new_tokens=9, temperature=1.0))
    finally:
        model.generation_config.min_new_tokens = None
    assert bool(out.mask.all()) and not bool((out.ids[:, :-1] == tok.eos_token_id).any())


def test_every_declared_end_token_ends_a_rollout(tiny, tmp_path):
    """A model whose generation config lists two end ids, neither the tokenizer's end token, stops at each."""
    tok = load_tokenizer(tiny["student"])
    model = load_causal_lm(tiny["student"]).eval()
    prompts = Prompts.from_lists([tok("7 + 8", add_special_tokens=False)["input_ids"]] * 8, tok.pad_token_id)
    seeds = row_seeds(1, 0, "rollout", range(8))
    sampling = SamplingConfig(max_new_tokens=10, temperature=1.0)
    free = LocalEngine(model, [tok.eos_token_id], tok.pad_token_id, EngineOptions()).generate(prompts, sampling, seeds)
    # Two tokens the unconstrained rollouts draw early, declared as end tokens in a saved generation config.
    first, second = free.ids[0, 1].item(), free.ids[1, 2].item()
    assert tok.eos_token_id not in (first, second) and first != second
    model.generation_config.eos_token_id = [first, second]
    model.save_pretrained(tmp_path / "model")
    reloaded = load_causal_lm(str(tmp_path / "model")).eval()
    eos = end_token_ids(reloaded, tok)
    assert eos == [first, second, tok.eos_token_id]
    out = LocalEngine(reloaded, eos, tok.pad_token_id, EngineOptions()).generate(prompts, sampling, seeds)
    for row in range(8):
        tokens, length = out.ids[row].tolist(), int(out.mask[row].sum())
        ends = [i for i, t in enumerate(free.ids[row].tolist()) if t in eos]
        # Each rollout is the unconstrained one cut at its first declared end token (or kept whole without one).
        assert length == (ends[0] + 1 if ends else free.ids.shape[1])
        assert tokens[:length] == free.ids[row, :length].tolist()
    assert int(out.mask[0].sum()) == 2 and int(out.mask[1].sum()) <= 3


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_static_cache_gives_the_default_rollouts(setup, temperature):
    sampling = SamplingConfig(max_new_tokens=12, temperature=temperature)
    default = run(setup, sampling, **GENERATE)
    assert default.ids.shape == (6, 12)
    assert_same_rollouts(run(setup, sampling, cache="static", **GENERATE), default)


@pytest.mark.slow
def test_compiled_decoding_gives_the_default_greedy_rollouts(setup):
    tok, model, prompts = setup
    sampling = SamplingConfig(max_new_tokens=12, temperature=0.0)
    default = run(setup, sampling, **GENERATE)
    traced = []
    # torch.compile runs Python hooks only while it traces, so a True here shows the decoding step was compiled.
    handle = model.lm_head.register_forward_hook(lambda *_: traced.append(torch.compiler.is_compiling()))
    try:
        for _ in range(2):  # the second call runs the compiled code without tracing again
            assert_same_rollouts(run(setup, sampling, cache="static", compile=True, **GENERATE), default)
    finally:
        handle.remove()
    assert any(traced)


def test_engine_options_are_checked():
    with pytest.raises(ValueError, match="static cache"):
        EngineOptions(compile=True, **GENERATE)
    with pytest.raises(ValueError, match="data.rollout.decoder: generate"):  # the native decoder has neither
        EngineOptions(cache="static")
    with pytest.raises(ValueError, match="cache must be"):
        EngineOptions(cache="sliding", **GENERATE)
    with pytest.raises(ValueError, match="decoder must be"):
        EngineOptions(decoder="vllm")
    with pytest.raises(ValueError, match="max_generation_rows"):
        EngineOptions(max_rows=0)


def test_rollout_options_reach_every_generation(tiny):
    default = OnPolicyDataModule(tokenizer=tiny["student"], train_data=tiny["train"])
    assert default.rollout.engine == EngineOptions()
    fast = RolloutOptions(generation_cache="static", compile_generation=True, decoder="generate", max_generation_rows=3)
    data = OnPolicyDataModule(tokenizer=tiny["student"], train_data=tiny["train"], rollout=fast)
    assert data.rollout.engine == EngineOptions("generate", "static", True, 3)
    with pytest.raises(ValueError, match="generation_cache: static"):
        RolloutOptions(compile_generation=True, decoder="generate")


def test_rollout_options_parse_from_yaml():
    parser = ArgumentParser()
    parser.add_class_arguments(OnPolicyDataModule, "data")
    cfg = parser.parse_string(
        "data:\n  rollout:\n    decoder: generate\n    generation_cache: static\n    compile_generation: true\n"
    )
    assert (cfg.data.rollout.generation_cache, cfg.data.rollout.compile_generation) == ("static", True)
    with pytest.raises(SystemExit):
        parser.parse_string("data:\n  rollout:\n    generation_cache: paged\n")
