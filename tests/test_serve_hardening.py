"""What the clients refuse or repair in a server's replies, read from vLLM's recorded exchange: scores that are
logits rather than log-probs, a dropped (``abort``) request asked again, the neutral sampling penalties every
generation request carries, and an API key named by its variable."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from trd_lightning.rollout.sampling import SamplingConfig
from trd_lightning.serve import ServiceError, ServiceOptions
from trd_lightning.serve.client import ServiceClient, generated_logprobs, prompt_scores
from trd_lightning.serve.generator import ServedEngine

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "vllm_completion.json").read_text())
QWEN_VOCAB = 151936


def client(options: ServiceOptions | None = None) -> ServiceClient:
    return ServiceClient("http://vllm.example:8000", options or ServiceOptions(), "model.teacher_url")


def test_logits_in_place_of_logprobs_are_refused_with_the_flag():
    """``--logprobs-mode raw_logits`` sends logits: a positive log-prob, or top-k holding more than all the mass."""
    choice = copy.deepcopy(FIXTURE["generate"]["reply"]["choices"][0])
    count = len(choice["token_ids"])
    assert len(generated_logprobs(client(), choice, count)) == count  # the record itself is fine
    choice["logprobs"]["token_logprobs"][2] = 3.5
    with pytest.raises(ServiceError, match="not log-probs.*--logprobs-mode"):
        generated_logprobs(client(), choice, count)
    scored = copy.deepcopy(FIXTURE["score"]["reply"]["choices"][0])
    prompt = FIXTURE["score"]["request"]["prompt"]
    prompt_scores(client(), scored, prompt, 9, 2, QWEN_VOCAB)
    for entry in scored["prompt_logprobs"][-1].values():  # every score of a position shifted up by 2 nats
        entry["logprob"] += 2.0
    with pytest.raises(ServiceError, match="not log-probs.*--logprobs-mode"):
        prompt_scores(client(), scored, prompt, 9, 2, QWEN_VOCAB)


class Replies:
    """Stands in for ``ServiceClient.complete``: recorded replies in order, and the bodies it was sent."""

    def __init__(self, replies: list[dict]) -> None:
        self.replies, self.bodies = list(replies), []

    def __call__(self, body: dict) -> dict:
        self.bodies.append(body)
        return self.replies.pop(0)


def test_an_aborted_request_is_asked_again_and_every_request_is_neutral():
    engine = ServedEngine("http://vllm.example:8000", ServiceOptions(retries=2), 151643, QWEN_VOCAB)
    done = FIXTURE["generate"]["reply"]
    aborted = copy.deepcopy(done)
    aborted["choices"][0].update(finish_reason="abort", token_ids=[17], logprobs=None)
    engine.client.complete = Replies([aborted, done])
    body = engine._body([[1, 2]], SamplingConfig(max_new_tokens=16, temperature=0.0), 0)
    rows = engine._generate_rows(body)
    assert rows[0][0] == done["choices"][0]["token_ids"] and len(engine.client.complete.bodies) == 2
    sent = engine.client.complete.bodies[0]
    assert (sent["repetition_penalty"], sent["presence_penalty"], sent["frequency_penalty"], sent["min_p"]) == (
        1.0, 0.0, 0.0, 0.0,
    )  # fmt: skip
    engine.client.complete = Replies([aborted] * 3)
    with pytest.raises(ServiceError, match="aborted a request 3 times"):
        engine._generate_rows(body)


def test_the_api_key_comes_from_the_variable_it_names(monkeypatch):
    monkeypatch.setenv("TRD_TEST_KEY", "k-123")
    keyed = client(ServiceOptions(api_key_env="TRD_TEST_KEY"))
    assert keyed._http.headers["Authorization"] == "Bearer k-123"
    assert "Authorization" not in client()._http.headers
    monkeypatch.delenv("TRD_TEST_KEY")
    with pytest.raises(ValueError, match="names TRD_TEST_KEY, which is not set: export TRD_TEST_KEY"):
        client(ServiceOptions(api_key_env="TRD_TEST_KEY"))


def test_a_server_without_prompt_logprobs_is_refused_as_a_teacher_but_named_as_a_refiner():
    """SGLang's completions route drops ``prompt_logprobs``: its reply to the start probe has none."""
    from trd_lightning.serve.teacher import ServedTeacher

    teacher = ServedTeacher("http://sglang.example:30000", ServiceOptions(), 2, QWEN_VOCAB)
    reply = copy.deepcopy(FIXTURE["score"]["reply"])
    reply["choices"][0].pop("prompt_logprobs")
    teacher.client.check = lambda tokenizer, vocab, probe, needed: (FIXTURE["score"]["request"]["prompt"], reply)
    with pytest.raises(ServiceError, match="returns no prompt_logprobs.*SGLang.*can still serve the refiner"):
        teacher.check(tokenizer=None)
