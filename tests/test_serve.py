"""Served refiners and teachers against real ``trd serve`` processes on loopback (the tiny teacher and student):
the reply layout of vLLM's protocol, the seed contract, TRD-OPD and TRD-OPSD rewrites equal to in-process ones, the
served top-k loss equal to the in-process one, and mismatched models refused at start."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from conftest import save_model
from fixtures.serving import Server
from helpers import KeepBatch, Recorder
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from trd_lightning import DistillationModule
from trd_lightning.hf import load_causal_lm, load_tokenizer
from trd_lightning.rollout.batch import Prompts
from trd_lightning.rollout.engines import EngineOptions, LocalEngine, end_token_ids
from trd_lightning.rollout.sampling import SamplingConfig
from trd_lightning.rollout.seeds import derive_seed
from trd_lightning.serve import ServiceError, ServiceOptions
from trd_lightning.serve.engine import BatchingWorker, Job
from trd_lightning.serve.generator import ServedEngine
from trd_lightning.serve.teacher import connect_teacher

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "vllm_completion.json").read_text())
QUICK = ServiceOptions(timeout=120, retries=1, backoff=0.5)
# The demo teacher is trained: its distributions are sharp, so its divergence from the tiny random student is large
# (a tolerance means something against it) and its greedy rewrites differ from row to row. It shares the tiny
# models' tokenizer.
TEACHER = "trd-demo/teacher"


@pytest.fixture(scope="module")
def servers(tiny, tmp_path_factory):
    """``trd serve`` of the demo teacher and of the tiny student, started together."""
    logs = tmp_path_factory.mktemp("serve_logs")
    models = {"teacher": TEACHER, "student": tiny["student"]}
    started = {name: Server(path, logs / f"{name}.log").start() for name, path in models.items()}
    try:
        yield {name: server.wait() for name, server in started.items()}
    finally:
        for server in started.values():
            server.stop()


def layout(value, path: str = "$"):
    """The shape of a reply: keys and value types, with token-keyed maps (top_logprobs, prompt_logprobs) reduced
    to the layout of their entries."""
    if isinstance(value, dict):
        if path.endswith(("top_logprobs[]", "prompt_logprobs[]")):
            return {"<token>": sorted({json.dumps(layout(v, path + ".v")) for v in value.values()})}
        return {k: layout(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return ["list", sorted({json.dumps(layout(v, path + "[]")) for v in value})]
    return type(value).__name__


def tiny_version(request: dict) -> dict:
    """The recorded request with token ids the tiny models have (same options)."""
    prompt = [i % 400 + 3 for i in request["prompt"]]
    return {**request, "model": None, "prompt": prompt}


def test_replies_keep_the_layout_of_vllms(servers):
    url = servers["teacher"].url
    for name in ("generate", "score"):
        ours = httpx.post(url + "/v1/completions", json=tiny_version(FIXTURE[name]["request"]), timeout=60).json()
        assert layout(ours) == layout(FIXTURE[name]["reply"]), name
    card = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]
    assert set(card) - {"vocab_size"} == set(FIXTURE["models"]["reply"]["data"][0])  # vocab_size: our extension
    tokenized = httpx.post(url + "/tokenize", json={**FIXTURE["tokenize"]["request"], "model": None}, timeout=10).json()
    assert layout(tokenized) == layout(FIXTURE["tokenize"]["reply"])
    error = httpx.post(url + "/v1/completions", json=tiny_version(FIXTURE["error"]["request"]), timeout=10)
    assert error.status_code == 400 and set(error.json()["error"]) == set(FIXTURE["error"]["reply"]["error"])
    assert "--max-logprobs" in error.json()["error"]["message"]


def test_a_row_depends_only_on_its_prompt_and_seed(servers, tiny):
    """Served rows (concurrent requests, batched by the server) equal in-process generation for the same seeds;
    sample i of an ``n``-sample request is seeded ``derive_seed(seed, 0, "sample", i)``."""
    tok = load_tokenizer(TEACHER)
    model = load_causal_lm(TEACHER)
    local = LocalEngine(model, end_token_ids(model, tok), tok.pad_token_id, EngineOptions())
    rows = [tok(f"{a} + {a + 3} =")["input_ids"] for a in range(6)]
    prompts, seeds = Prompts.from_lists(rows, tok.pad_token_id), [derive_seed(7, 1, "refine", i) for i in range(6)]
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.8, top_p=0.9, top_k=40)
    engine = ServedEngine(servers["teacher"].url, QUICK, tok.pad_token_id, len(tok))
    served = engine.generate(prompts, sampling, seeds)
    expected = local.generate(prompts, sampling, seeds)
    # Scoring given responses (the protocol's other half) through prompt_logprobs: the in-process log-probs.
    torch.testing.assert_close(engine.logprobs(prompts, expected), local.logprobs(prompts, expected), atol=1e-5, rtol=0)
    assert served.lists() == expected.lists() and len({tuple(r) for r in served.lists()}) > 1
    torch.testing.assert_close(served.logprobs, expected.logprobs, atol=1e-5, rtol=0)
    assert torch.equal(served.truncated, expected.truncated)
    body = {"prompt": rows[0], "max_tokens": 10, "temperature": 0.8, "top_p": 0.9, "top_k": 40, "seed": 11, "n": 3}
    reply = httpx.post(servers["teacher"].url + "/v1/completions", json={**body, "return_token_ids": True}, timeout=60)
    samples = [c["token_ids"] for c in reply.json()["choices"]]
    sample_seeds = [derive_seed(11, 0, "sample", i) for i in range(3)]
    assert samples == local.generate(prompts.rows([0, 0, 0]), sampling, sample_seeds).lists()


def test_the_worker_batches_requests_that_arrive_together(tiny):
    tok = load_tokenizer(tiny["teacher"])
    model = load_causal_lm(tiny["teacher"])
    engine = LocalEngine(model, end_token_ids(model, tok), tok.pad_token_id, EngineOptions())
    worker = BatchingWorker(engine, max_rows=16, wait=1.0)
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0)
    try:
        jobs = [Job([tok(f"{a} * 2 =")["input_ids"]], [a], sampling) for a in range(4)]
        futures = [worker.submit(job) for job in jobs]  # all in before the first one's wait ends
        results = [f.result(timeout=120) for f in futures]
        assert worker.batches == 1  # four requests, one generation
        alone = [worker.run([Job(job.prompts, job.seeds, sampling)])[0] for job in jobs]
        assert [r.tokens for r in results] == [r.tokens for r in alone]
    finally:
        worker.close()


def trd_runs(make_run, root, data: dict, model: dict | None = None, steps: int = 2):
    """(kept batches, losses) of a TRD run (every rollout refined) with ``data`` on top of the tiny defaults."""
    keep, rec = KeepBatch(), Recorder()
    model = {"teacher": TEACHER, **(model or {})}
    trainer, module, dm = make_run(root=root, model=model, data=data, callbacks=[keep, rec], max_steps=steps)
    trainer.fit(module, dm)
    return keep.batches, rec.losses


def assert_same_rewrites(served, local):
    assert len(served) == len(local)
    for a, b in zip(served, local):
        x, y = a.produced, b.produced
        assert bool(x.refined.all()) and torch.equal(x.refined, y.refined)
        assert x.refined_text == y.refined_text
        assert torch.equal(x.train.response_ids, y.train.response_ids)
        assert torch.equal(x.train.response_mask, y.train.response_mask)
        torch.testing.assert_close(x.train.behavior_logprobs, y.train.behavior_logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_trd_opd_with_a_served_refiner_gives_the_in_process_rewrites(make_run, servers, tiny, tmp_path, temperature):
    refine = {"enabled": True, "temperature": temperature, "top_p": 0.95, "top_k": 20}
    local, local_losses = trd_runs(make_run, tmp_path / "local", {"refine": refine})
    served_refine = {**refine, "url": servers["teacher"].url, "service": QUICK}
    served, served_losses = trd_runs(make_run, tmp_path / "served", {"refine": served_refine})
    assert_same_rewrites(served, local)
    assert len({t for b in local for t in b.produced.refined_text}) > 1
    assert served_losses == pytest.approx(local_losses, rel=1e-5)


def test_trd_opsd_refiner_served_from_the_students_starting_weights(make_run, servers, tiny, tmp_path):
    """OPSD refines with the initial student shown the reference: ``trd serve --model <student>`` gives the rewrites
    of the in-process frozen initial copy, at every step (the student trains; the served copy never changes)."""
    model = {"teacher_kind": "shared", "shared_weights": "initial"}
    refine = {"enabled": True, "temperature": 0.7, "top_p": 0.95, "top_k": 20}
    data = {"teacher_context": "privileged"}
    local, local_losses = trd_runs(make_run, tmp_path / "local", {**data, "refine": refine}, model)
    served_refine = {**refine, "url": servers["student"].url, "service": QUICK}
    served, served_losses = trd_runs(make_run, tmp_path / "served", {**data, "refine": served_refine}, model)
    assert_same_rewrites(served, local)
    assert served_losses == pytest.approx(local_losses, rel=1e-5)


@pytest.mark.parametrize(
    "loss, refined",
    [("topk", False), ("sampled_token", False), ("topk", True)],
    ids=["topk", "sampled_token", "trd_topk"],
)
def test_the_served_teachers_loss_equals_the_in_process_one(make_run, servers, tiny, tmp_path, loss, refined):
    """No teacher weights in the trainer: the step's top-k scores come from the service, and the losses of the
    in-process teacher come out, to 1e-5 (TRD: the same service refines too)."""
    model = {"loss": loss, "loss_top_k": 8, "beta": 0.0}
    refine = {"enabled": True, "temperature": 0.0} if refined else {}
    url = servers["teacher"].url
    local, local_losses = trd_runs(make_run, tmp_path / "local", {"refine": refine}, model)
    served_refine = {**refine, "url": url, "service": QUICK} if refined else {}
    keep, rec = KeepBatch(), Recorder()
    served_model = {**model, "teacher_url": url, "teacher_service": QUICK, "micro_batch_size": 2}
    trainer, module, dm = make_run(
        root=tmp_path / "served", model=served_model, data={"refine": served_refine}, callbacks=[keep, rec]
    )
    trainer.fit(module, dm)
    assert module.teacher is None and module.served_teacher is not None
    assert sorted(rec.losses) == [1, 2] and all(v > 0.1 for v in rec.losses.values())
    for step in (1, 2):
        assert rec.losses[step] == pytest.approx(local_losses[step], rel=1e-5, abs=0)
    if refined:
        assert_same_rewrites(keep.batches, local)


def test_the_monitors_protocol_works_with_a_served_teacher(make_run, servers, tiny, tmp_path):
    """``sequence_token_losses`` and ``token_statistics`` (what the fragmentation and prefix monitors call) fetch the
    view's scores from the service: the losses equal the in-process ones, the teacher's top-1, top-2 and token
    log-prob are exact, and KL and entropy over the top-k and a tail bin bound the full-vocabulary ones from below."""
    keep = KeepBatch()
    trainer, module, dm = make_run(model={"teacher": TEACHER}, callbacks=[keep], max_steps=1)
    trainer.fit(module, dm)
    view = keep.batches[0].produced.train
    settings = {"student": tiny["student"], "teacher": TEACHER, "loss": "topk", "loss_top_k": 8}
    local = DistillationModule(**settings)
    served = DistillationModule(**settings, teacher_url=servers["teacher"].url, teacher_service=QUICK)
    served.served_teacher = connect_teacher(served.hparams, QUICK, len(load_tokenizer(tiny["student"])))
    for m in (local, served):
        m.configure_model()
    assert served.teacher is None
    with torch.no_grad():
        got, mask = served.sequence_token_losses(view, slice(0, 3))
        want, _ = local.sequence_token_losses(view, slice(0, 3))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got, mask = served.token_statistics(view, slice(0, 4))
    want, _ = local.token_statistics(view, slice(0, 4))
    for name in ("teacher_top1", "teacher_top2", "teacher_token_logprob"):
        torch.testing.assert_close(got[name][mask], want[name][mask], atol=1e-5, rtol=1e-5, msg=name)
    for name in ("kl", "teacher_entropy"):
        assert bool((got[name][mask] <= want[name][mask] + 1e-5).all()), name
    assert bool((got["kl"][mask] > 0).all())


def test_trd_opd_with_a_served_teacher_needs_a_served_refiner(make_run, servers, tiny, tmp_path):
    model = {"loss": "topk", "loss_top_k": 8, "teacher_url": servers["teacher"].url, "teacher_service": QUICK}
    trainer, module, data = make_run(model=model, data={"refine": {"enabled": True}})
    with pytest.raises(ValueError, match="set data.refine.url to a service of the teacher"):
        trainer.fit(module, data)
    assert module.student is None


def other_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer of the demo's size and special tokens, trained on other text: it splits text differently."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([f"refine naive cafe {i} {i * 7} done" for i in range(3000)], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")


def test_a_model_with_another_vocabulary_or_tokenizer_is_refused_at_start(make_run, servers, tiny, tmp_path):
    url = servers["teacher"].url
    refine = {"enabled": True, "url": url, "service": QUICK}
    # The teacher's service against a student whose embedding is 64 rows larger.
    trainer, module, data = make_run(
        root=tmp_path / "a", model={"student": tiny["other_vocab"]}, data={"refine": refine}
    )
    with pytest.raises(ServiceError, match="a vocabulary of 512 where the student's has 576"):
        trainer.fit(module, data)
    foreign = save_model(tmp_path / "foreign", other_tokenizer(), seed=4, hidden=16, layers=1, vocab=512)
    trainer, module, data = make_run(root=tmp_path / "b", model={"student": foreign}, data={"refine": refine})
    with pytest.raises(ServiceError, match="with a tokenizer that splits a probe text into"):
        trainer.fit(module, data)
    # The service allows 20 log-probs per position: a teacher asking 32 hears it at start, with the fix.
    model = {"loss": "topk", "loss_top_k": 32, "teacher_url": url, "teacher_service": QUICK}
    trainer, module, data = make_run(root=tmp_path / "c", model=model)
    with pytest.raises(ServiceError, match="larger --max-logprobs"):
        trainer.fit(module, data)
    assert module.student is None
