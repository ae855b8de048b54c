"""Every served path against a real vLLM (its CPU build, started on loopback from ``.ci/vllm-env``'s environment):
the refiner's greedy rewrites and the teacher's top-k loss against in-process ones, the start checks on a good and a
misconfigured server, and the student's rollouts synced after every step (a LoRA adapter, full weights, and one
step of overlap).

vLLM's kernels may break a near-tie differently from ours, so a greedy row may differ: each comparison bounds the
share of differing rows (and prints it) rather than skipping. The demo models are used (vLLM's CPU attention needs a
head size of 32 or more); they share the tiny models' tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import lightning as L
import pytest
from fixtures.rollouts import InProcessTwin
from fixtures.vllm import VllmServer
from helpers import KeepBatch, Recorder

from trd_lightning.hf import locate
from trd_lightning.lora import LoraOptions
from trd_lightning.serve import ServiceError, ServiceOptions

TEACHER, STUDENT = str(locate("trd-demo/teacher")), str(locate("trd-demo/student"))
# The teacher's server wants an API key, read from this variable by the client (api_key_env).
KEY_ENV = "TRD_TEST_VLLM_KEY"
os.environ[KEY_ENV] = "test-key-not-a-secret"
QUICK = ServiceOptions(timeout=300, retries=1, backoff=0.5)
KEYED = ServiceOptions(timeout=300, retries=1, backoff=0.5, api_key_env=KEY_ENV)
# At most this share of greedy rows may differ from in-process decoding (near-ties broken by other kernels).
TIE_SHARE = 0.125
FAST = {"lr": 0.05, "max_grad_norm": None}
GREEDY = {"temperature": 0.0, "max_new_tokens": 12}


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    """Two vLLM servers, started together: the demo teacher (behind an API key), and the demo student with runtime
    LoRA updates and the development mode's ``/collective_rpc`` (full-weight reloads)."""
    logs = tmp_path_factory.mktemp("vllm_logs")
    lora = ("--enable-lora", "--max-lora-rank", "8")
    dev = {"VLLM_SERVER_DEV_MODE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    # The teacher with a repetition penalty in its generation config, which vLLM applies to every request that
    # does not set one: the client's neutral penalties must keep the rewrites the in-process ones.
    teacher = Path(shutil.copytree(TEACHER, tmp_path_factory.mktemp("teacher") / "model"))
    config = json.loads((teacher / "generation_config.json").read_text())
    (teacher / "generation_config.json").write_text(json.dumps({**config, "repetition_penalty": 1.3}))
    servers = {
        "teacher": VllmServer(str(teacher), logs / "teacher.log", "--api-key", os.environ[KEY_ENV]).start(),
        "student": VllmServer(STUDENT, logs / "student.log", *lora, env=dev).start(),
    }
    try:
        yield {name: server.wait(600) for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.stop()


def fit(make_run, root, model=None, data=None, steps=1, batch_size=4, callbacks=()):
    keep, rec = KeepBatch(), Recorder()
    trainer, module, dm = make_run(
        root=root,
        model=model,
        data={"batch_size": batch_size, **(data or {})},
        callbacks=[keep, rec, *callbacks],
        max_steps=steps,
        logger=L.pytorch.loggers.CSVLogger(str(root)),
    )
    L.seed_everything(0)
    trainer.fit(module, dm)
    return keep.batches, rec.losses, trainer


def differing_share(served: list, local: list) -> float:
    rows = [(a, b) for x, y in zip(served, local) for a, b in zip(x, y)]
    return sum(a != b for a, b in rows) / len(rows)


def test_the_served_refiners_greedy_rewrites_are_the_in_process_ones(make_run, vllm, tmp_path):
    refine = {"enabled": True, "temperature": 0.0}
    data = {"refine": refine, "rollout": {"num_generations": 2}}
    local, _, _ = fit(make_run, tmp_path / "local", {"teacher": TEACHER}, data, batch_size=8)
    served_data = {**data, "refine": {**refine, "url": vllm["teacher"].url, "service": KEYED}}
    served, _, _ = fit(make_run, tmp_path / "served", {"teacher": TEACHER}, served_data, batch_size=8)
    texts = [b.produced.refined_text for b in local]
    assert all(b.produced.refined.all() for b in served) and len({t for x in texts for t in x}) > 4
    share = differing_share([b.produced.refined_text for b in served], texts)
    print(f"vLLM refiner: {share:.1%} of 16 greedy rewrites differ from in-process ones")
    assert share <= TIE_SHARE


@pytest.mark.parametrize("loss", ["topk", "sampled_token"])
def test_the_served_teachers_loss_is_the_in_process_one(make_run, vllm, tmp_path, loss):
    """vLLM's float32 kernels are not ours: the step's loss agrees to 1e-3 relative (the rollouts are the same)."""
    model = {"teacher": TEACHER, "loss": loss, "loss_top_k": 8}
    _, local, _ = fit(make_run, tmp_path / "local", model)
    served_model = {**model, "teacher_url": vllm["teacher"].url, "teacher_service": KEYED}
    _, served, trainer = fit(make_run, tmp_path / "served", served_model)
    assert trainer.lightning_module.teacher is None and abs(local[1]) > 0.05
    assert served[1] == pytest.approx(local[1], rel=1e-3)


def test_the_start_checks_refuse_a_misconfigured_server_with_the_fix(make_run, vllm, tiny, tmp_path):
    url = vllm["teacher"].url
    # No key for a server started with --api-key.
    model = {"loss": "topk", "loss_top_k": 8, "teacher_url": url, "teacher_service": QUICK}
    trainer, module, dm = make_run(root=tmp_path / "key", model=model)
    with pytest.raises(ServiceError, match="wants an API key.*api_key_env"):
        trainer.fit(module, dm)
    # Top-32 scores from a server that allows 20 (--max-logprobs 20).
    model = {"loss": "topk", "loss_top_k": 32, "teacher_url": url, "teacher_service": KEYED}
    trainer, module, dm = make_run(root=tmp_path / "a", model=model)
    with pytest.raises(ServiceError, match="larger --max-logprobs"):
        trainer.fit(module, dm)
    # Rewrites longer than its context (--max-model-len 512): vLLM would cut them short without a word.
    refine = {"enabled": True, "url": url, "service": KEYED, "max_prompt_length": 500, "max_new_tokens": 64}
    trainer, module, dm = make_run(root=tmp_path / "b", model={"teacher": TEACHER}, data={"refine": refine})
    with pytest.raises(
        ServiceError, match="holds 512 positions, but the run's longest request needs 564.*--max-model-len"
    ):
        trainer.fit(module, dm)
    # A student whose vocabulary is 64 ids larger: vLLM's cards carry no vocabulary, the probe's last id fails.
    trainer, module, dm = make_run(
        root=tmp_path / "c",
        model={"student": tiny["other_vocab"]},
        data={"refine": {**refine, "max_prompt_length": 400}},
    )
    with pytest.raises(ServiceError, match="575.*serve one with the student's vocabulary"):
        trainer.fit(module, dm)
    assert module.student is None  # each refused before any weights loaded


def student_run(make_run, root, url, model, data=None, steps=3):
    twin = InProcessTwin()
    data = data or {}
    rollout = {**GREEDY, "url": url, "service": QUICK, **data.get("rollout", {})}
    batches, losses, trainer = fit(
        make_run, root, {"student": STUDENT, **FAST, **model}, {**data, "rollout": rollout}, steps, callbacks=[twin]
    )
    return twin, batches, trainer


def test_a_lora_students_rollouts_are_the_in_process_ones_of_the_same_weights(make_run, vllm, tmp_path):
    twin, _, trainer = student_run(make_run, tmp_path, vllm["student"].url, {"lora": LoraOptions(r=8, alpha=16)})
    gap = twin.logprob_gap
    print(f"vLLM LoRA student: {twin.differing} of {twin.rows} greedy rollouts differ; log-prob gap {gap:.2e}")
    assert twin.differing / twin.rows <= TIE_SHARE and twin.logprob_gap < 1e-3
    assert twin.staleness == [0, 0, 0] and twin.from_start[-1] > 0  # the adapter moved the rollouts
    assert trainer.datamodule.served_student.client.model == "student"  # requests name the adapter
    assert trainer.logged_metrics["perf/sync_seconds"] > 0


def test_trd_opsd_with_the_refiner_and_the_lora_student_on_one_server(make_run, vllm, tmp_path):
    """The server's base model (the starting student) refines, the adapter samples: greedy rewrites equal the
    in-process run's, up to near-ties."""
    model = {"student": STUDENT, "teacher_kind": "shared", "shared_weights": "initial", **FAST}
    model["lora"] = LoraOptions(r=8, alpha=16)
    refine = {"enabled": True, "temperature": 0.0}
    data = {"teacher_context": "privileged", "rollout": GREEDY}
    local, _, _ = fit(make_run, tmp_path / "local", model, {**data, "refine": refine}, steps=2)
    url = vllm["student"].url
    served_data = {**data, "refine": {**refine, "url": url, "service": QUICK}}
    twin, served, _ = student_run(make_run, tmp_path / "served", url, model, served_data, steps=2)
    share = differing_share([b.produced.refined_text for b in served], [b.produced.refined_text for b in local])
    print(f"vLLM TRD-OPSD on one server: {share:.1%} of rewrites, {twin.differing} of {twin.rows} rollouts differ")
    assert share <= TIE_SHARE and twin.differing / twin.rows <= TIE_SHARE


def test_trd_opd_served_and_overlapped(make_run, vllm, tmp_path):
    """TRD-OPD with the student's rollouts and the rewrites on vLLM, one step of overlap: each step after the
    first trains on rollouts of the weights one step older, and they are the in-process rollouts of those weights."""
    refine = {"enabled": True, "temperature": 0.0, "url": vllm["teacher"].url, "service": KEYED}
    data = {"refine": refine, "rollout": {"max_staleness": 1}}
    twin, batches, trainer = student_run(
        make_run, tmp_path, vllm["student"].url, {"teacher": TEACHER, "lora": LoraOptions(r=8, alpha=16)}, data, 4
    )
    assert twin.staleness == [0, 1, 1, 1] and twin.differing / twin.rows <= TIE_SHARE
    assert all(b.produced.refined.all() for b in batches)


@pytest.mark.xfail(
    strict=True,
    reason="vLLM 0.32's CPU build: after an in-place reload_weights its oneDNN linear layers keep computing with "
    "weights other than the new ones (a single reload into a fresh server matches generate; later reloads drift, "
    "with top-2 gaps of 0.3 nats, so not near-ties). trd serve's full-weight sync is exact (test_served_student).",
)
def test_a_full_students_rollouts_are_the_in_process_ones_of_the_same_weights(make_run, vllm, tmp_path):
    url = vllm["student"].url
    try:
        # Full fine-tuning moves every weight by about the learning rate (Adam): 0.05 would flatten the demo
        # student's distributions into near-ties; 5e-3 still moves its greedy rollouts.
        twin, _, trainer = student_run(make_run, tmp_path, url, {"lr": 5e-3})
        print(f"vLLM full student: {twin.differing} of {twin.rows} greedy rollouts differ ({twin.per_step} by step)")
        assert twin.differing / twin.rows <= TIE_SHARE and twin.logprob_gap < 1e-3
        assert twin.staleness == [0, 0, 0] and twin.from_start[-1] > 0
    finally:  # the server's base model back to the demo student, for whatever runs after
        body = {"method": "reload_weights", "kwargs": {"weights_path": STUDENT}}
        assert httpx.post(url + "/collective_rpc", json=body, timeout=120).status_code == 200
