"""The served protocol without a model: reading vLLM's recorded replies, malformed replies, the served top-k loss
against the in-process one, timeouts and retries against a host that never answers, and settings refused early."""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from trd_lightning import DistillationModule, losses
from trd_lightning.data.options import RefineOptions
from trd_lightning.diagnostics import token_distribution_stats
from trd_lightning.serve import ServiceError, ServiceOptions
from trd_lightning.serve.client import ServiceClient, prompt_scores
from trd_lightning.serve.generator import ServedEngine

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "vllm_completion.json").read_text())
QWEN_VOCAB = 151936


def client() -> ServiceClient:
    return ServiceClient("http://vllm.example:8000/v1", ServiceOptions(), "data.refine.url")


def test_client_reads_the_recorded_vllm_generation():
    engine = ServedEngine("http://vllm.example:8000", ServiceOptions(), pad_id=151643, vocab_size=QWEN_VOCAB)
    reply = FIXTURE["generate"]["reply"]
    ids, logprobs, truncated = engine._read(reply["choices"][0], FIXTURE["generate"]["request"]["max_tokens"])
    assert ids == [17, 488, 220, 17, 284, 220, 19, 13, 151645]  # the end token is part of the response
    assert logprobs[0] == pytest.approx(-0.03125) and logprobs[-1] == pytest.approx(-0.0001983642578125)
    assert truncated is False  # finish_reason "stop"
    cut = copy.deepcopy(reply["choices"][0])
    cut["finish_reason"] = "length"
    assert engine._read(cut, 16)[2] is True


def test_client_reads_the_recorded_vllm_prompt_logprobs():
    request, reply = FIXTURE["score"]["request"], FIXTURE["score"]["reply"]
    prompt = request["prompt"]
    ids, values, own = prompt_scores(client(), reply["choices"][0], prompt, 9, 2, QWEN_VOCAB)
    positions = reply["choices"][0]["prompt_logprobs"]
    assert len(ids) == len(values) == len(own) == 9
    for j, at in enumerate(range(len(prompt) - 9, len(prompt))):
        entries = positions[at]
        by_rank = sorted((e["rank"], int(t), e["logprob"]) for t, e in entries.items())[:2]
        # By hand from the record: the top-2 in rank order, and the prompt's own token wherever it ranks.
        assert ids[j] == [t for _, t, _ in by_rank] and values[j] == [v for _, _, v in by_rank]
        assert own[j] == entries[str(prompt[at])]["logprob"]
    assert values[0][0] >= values[0][1]


@pytest.mark.parametrize(
    "break_it, message",
    [
        (lambda c: c.pop("prompt_logprobs"), "prompt_logprobs has none"),
        (lambda c: c["prompt_logprobs"].pop(), "prompt_logprobs has 24 positions for a prompt of 25 tokens"),
        (lambda c: c["prompt_logprobs"][-1].pop("151645"), "lacks the prompt's token 151645"),
        (lambda c: c["prompt_logprobs"][-1]["151645"].pop("rank"), "without a rank and a logprob"),
    ],
)
def test_malformed_prompt_logprobs_name_the_address_and_the_fault(break_it, message):
    choice = copy.deepcopy(FIXTURE["score"]["reply"]["choices"][0])
    break_it(choice)
    with pytest.raises(ServiceError, match="vllm.example:8000") as error:
        prompt_scores(client(), choice, FIXTURE["score"]["request"]["prompt"], 9, 2, QWEN_VOCAB)
    assert message in str(error.value) and "malformed" in str(error.value)


def test_too_few_entries_and_foreign_ids_are_refused():
    choice = FIXTURE["score"]["reply"]["choices"][0]
    with pytest.raises(ServiceError, match="holds 2 entries for prompt_logprobs=3"):
        prompt_scores(client(), choice, FIXTURE["score"]["request"]["prompt"], 9, 3, QWEN_VOCAB)
    with pytest.raises(ServiceError, match="outside the student's vocabulary of 1000"):
        prompt_scores(client(), choice, FIXTURE["score"]["request"]["prompt"], 9, 2, 1000)
    engine = ServedEngine("http://vllm.example:8000", ServiceOptions(), 0, QWEN_VOCAB)
    generated = copy.deepcopy(FIXTURE["generate"]["reply"]["choices"][0])
    with pytest.raises(ServiceError, match="9 generated tokens for max_tokens=4"):
        engine._read(generated, 4)
    generated["token_ids"] = None
    with pytest.raises(ServiceError, match="no token_ids list"):
        engine._read(generated, 16)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("tail", [True, False])
def test_served_topk_divergence_equals_topk_divergence(beta, tail):
    """From the teacher's top-k log-probs alone, the same value and student gradient as ``topk_divergence`` on the
    teacher's full logits (to 1e-5)."""
    torch.manual_seed(0)
    student = (torch.randn(64, 200) * 2).requires_grad_()
    teacher = torch.randn(64, 200) * 2
    top, ids = teacher.log_softmax(-1).topk(16, dim=-1)
    served = losses.served_topk_divergence(student, top, ids, beta, tail)
    full = losses.topk_divergence(student, teacher, 16, beta, 1.0, tail, "teacher")
    torch.testing.assert_close(served, full, atol=1e-5, rtol=1e-5)
    (g_served,) = torch.autograd.grad(served.sum(), student)
    (g_full,) = torch.autograd.grad(full.sum(), student)
    torch.testing.assert_close(g_served, g_full, atol=1e-5, rtol=1e-5)


def test_served_statistics_are_exact_where_they_can_be_and_bounds_elsewhere():
    torch.manual_seed(1)
    student, teacher = torch.randn(32, 100), torch.randn(32, 100) * 3
    tokens = torch.randint(0, 100, (32,))
    full = token_distribution_stats(student, teacher, tokens)
    logp = teacher.log_softmax(-1)
    top, ids = logp.topk(8, dim=-1)
    served = losses.served_token_statistics(student, top, ids, logp.gather(-1, tokens[:, None])[:, 0])
    torch.testing.assert_close(served[:, 2:], full[:, 2:])  # top-1, top-2 and the token's log-prob: exact
    assert bool((served[:, :2] <= full[:, :2] + 1e-5).all())  # coarser bins: KL and entropy from below
    every = losses.served_token_statistics(student, *logp.topk(100, dim=-1), logp.gather(-1, tokens[:, None])[:, 0])
    torch.testing.assert_close(every, full, atol=1e-5, rtol=1e-5)  # the whole vocabulary: the full values


@pytest.mark.parametrize(
    "kwargs, fix",
    [
        ({"loss": "jsd"}, "set model.loss: topk"),
        ({"loss": "pointwise_clip"}, "set model.loss: topk"),
        ({"loss": "topk", "loss_temperature": 2.0}, "loss_temperature: 1.0"),
        ({"loss": "topk", "loss_top_k_support": "student"}, "loss_top_k_support: teacher"),
        ({"loss": "topk", "teacher_kind": "shared"}, "teacher_kind: frozen"),
    ],
)
def test_a_served_teacher_refuses_what_it_cannot_feed_at_construction(kwargs, fix):
    with pytest.raises(ValueError, match=fix):
        DistillationModule(teacher_url="http://127.0.0.1:9", **kwargs)


def test_addresses_are_checked_at_construction():
    with pytest.raises(ValueError, match="model.teacher_url must be an http"):
        DistillationModule(teacher_url="localhost:8000", loss="topk")
    with pytest.raises(ValueError, match="data.refine.url must be an http"):
        RefineOptions(enabled=True, url="localhost:8000")
    with pytest.raises(ValueError, match="needs no data.refine.url"):
        RefineOptions(enabled=True, url="http://localhost:8000", offline_round="round")


class SilentHost:
    """A host that accepts connections and never answers (a hung server); counts the connections and their times."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(16)
        self.accepted: list[float] = []
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.socket.accept()
            except OSError:
                return
            self.accepted.append(time.monotonic())
            self.held.append(conn)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.socket.getsockname()[1]}"

    def close(self) -> None:
        for conn in self.held:
            conn.close()
        self.socket.close()


def test_a_slow_service_times_out_and_is_retried_with_exponential_backoff():
    host = SilentHost()
    try:
        service = ServiceClient(host.url, ServiceOptions(timeout=0.4, retries=2, backoff=0.3), "model.teacher_url")
        with pytest.raises(ServiceError, match="failed POST /v1/completions 3 times; last: no reply within 0.4 s"):
            service.request("POST", "/v1/completions", {"prompt": [1]})
        assert len(host.accepted) == 3  # the first try and two retries, each on its own connection
        gaps = [b - a for a, b in zip(host.accepted, host.accepted[1:])]
        # Each gap is the timeout plus the backoff: 0.3 s, then twice that.
        assert gaps[0] == pytest.approx(0.4 + 0.3, abs=0.25) and gaps[1] == pytest.approx(0.4 + 0.6, abs=0.25)
    finally:
        host.close()


def test_a_service_that_is_not_up_is_named_before_any_weights_load(make_run, tiny, tmp_path):
    port = SilentHost()  # a port nothing serves once closed
    url = port.url
    port.close()
    quick = ServiceOptions(timeout=2, retries=0, backoff=0)
    trainer, module, data = make_run(
        root=tmp_path / "teacher", model={"teacher_url": url, "loss": "topk", "teacher_service": quick}
    )
    with pytest.raises(ServiceError, match=f"No service answers at {url} \\(model.teacher_url\\)"):
        trainer.fit(module, data)
    assert module.student is None  # stopped in setup, before configure_model
    trainer, module, data = make_run(
        root=tmp_path / "refiner", data={"refine": {"enabled": True, "url": url, "service": quick}}
    )
    with pytest.raises(ServiceError, match=f"No service answers at {url} \\(data.refine.url\\)"):
        trainer.fit(module, data)
    assert module.student is None


def test_the_served_overlays_set_the_addresses_on_their_bases():
    from trd_lightning.cli import cli_main

    folder = Path(__file__).parents[1] / "configs"
    on_cpu = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto"]

    def load(*names: str):
        return cli_main([arg for n in names for arg in ("--config", str(folder / n))] + on_cpu, run=False)

    demo = load("demo.yaml", "trd.yaml", "demo_trd_served.yaml")
    assert demo.datamodule.refine.enabled and demo.datamodule.refine.url == "http://127.0.0.1:8000"
    assert demo.datamodule.refine.service == ServiceOptions(timeout=120.0)
    assert demo.model.hparams.teacher_url is None  # the demo scores with its in-process teacher
    qwen = load("qwen3_opd.yaml", "trd.yaml", "qwen3_trd_opd_served.yaml")
    assert qwen.model.hparams.teacher_url == qwen.datamodule.refine.url == "http://localhost:8000"
    assert qwen.model.hparams.loss == "topk" and qwen.model.hparams.loss_top_k == 64
    assert qwen.model.teacher_service.max_concurrency == 64 and qwen.model.student is None
