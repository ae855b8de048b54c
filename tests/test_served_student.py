"""The student's rollouts from a served engine (``data.rollout.url``) against real ``trd serve`` processes: its weights
synced after every optimizer step (a LoRA adapter, or the full weights), one step of overlap, one server holding a
TRD-OPSD run's refiner and student, and an engine that dies mid-run."""

from __future__ import annotations

import lightning as L
import pytest
from fixtures.rollouts import InProcessTwin
from fixtures.serving import Server
from helpers import CONFIGS, KeepBatch, Recorder, demo_on_tiny, scalars, trd

from trd_lightning.lora import LoraOptions
from trd_lightning.serve import ServiceError, ServiceFailureCheckpoint, ServiceOptions

QUICK = ServiceOptions(timeout=120, retries=1, backoff=0.5)
# A learning rate at which three steps move the tiny student's greedy rollouts: the sync must carry them.
FAST = {"lr": 0.05, "max_grad_norm": None}
GREEDY = {"temperature": 0.0, "max_new_tokens": 12}


@pytest.fixture
def student_server(tiny, tmp_path):
    server = Server(tiny["student"], tmp_path / "serve.log").start().wait()
    yield server
    server.stop()


def served_run(make_run, root, url, model=None, data=None, steps=3, callbacks=()):
    twin, keep, rec = InProcessTwin(), KeepBatch(), Recorder()
    rollout = {**GREEDY, "url": url, "service": QUICK, **(data or {}).pop("rollout", {})}
    trainer, module, dm = make_run(
        root=root,
        model={**FAST, **(model or {})},
        data={**(data or {}), "rollout": rollout},
        callbacks=[twin, keep, rec, *callbacks],
        max_steps=steps,
        logger=L.pytorch.loggers.CSVLogger(str(root)),
    )
    L.seed_everything(0)  # a LoRA adapter's starting weights are drawn in fit
    trainer.fit(module, dm)
    return twin, keep, rec, trainer


@pytest.mark.parametrize("student", ["lora", "full"])
def test_served_rollouts_are_the_in_process_ones_of_the_same_weights(make_run, student_server, tmp_path, student):
    model = {"lora": LoraOptions(r=4, alpha=8)} if student == "lora" else {}
    twin, keep, rec, trainer = served_run(make_run, tmp_path, student_server.url, model)
    assert twin.rows == 3 * 4 and twin.differing == 0 and twin.logprob_gap < 1e-5
    assert twin.staleness == [0, 0, 0]
    assert (
        twin.from_start[0] == 0 and twin.from_start[-1] > 0
    )  # the weights moved the rollouts, and the engine had them
    sync = trainer.datamodule.weight_sync
    assert sync.version == 2 and [p.name for p in sync.directory.iterdir()] == ["v0000002"]  # older versions removed
    written = {p.name for p in (sync.directory / "v0000002").iterdir()}
    assert ("adapter_model.safetensors" in written) == (student == "lora")
    assert ("model.safetensors" in written) == (student == "full")
    assert trainer.logged_metrics["perf/sync_seconds"] > 0


def test_overlap_makes_the_next_steps_rollouts_from_the_weights_one_step_older(make_run, student_server, tmp_path):
    data = {"rollout": {"max_staleness": 1}}
    twin, keep, rec, trainer = served_run(make_run, tmp_path, student_server.url, data=data, steps=4)
    # The first step has nothing made in advance; every later one was made while the step before trained.
    assert twin.staleness == [0, 1, 1, 1]
    assert twin.differing == 0 and twin.logprob_gap < 1e-5
    assert trainer.logged_metrics["rollout/staleness"] == 1
    # The data order is the synchronous run's: overlap changes when a batch is made, not which prompts it holds.
    _, sync_keep, _, _ = served_run(make_run, tmp_path / "sync", student_server.url, steps=4)
    assert [b.index.tolist() for b in keep.batches] == [b.index.tolist() for b in sync_keep.batches]


def test_one_server_holds_the_refiner_and_the_lora_student_of_trd_opsd(make_run, student_server, tmp_path):
    """TRD-OPSD with a LoRA student: the base model the server started with is the refiner (the initial student),
    the adapter it is sent each step is the student. The run equals the in-process one."""
    model = {"teacher_kind": "shared", "shared_weights": "initial", "lora": LoraOptions(r=4, alpha=8), **FAST}
    refine = {"enabled": True, "temperature": 0.7, "top_p": 0.95, "top_k": 20}
    data = {"teacher_context": "privileged"}
    local_keep, local_rec = KeepBatch(), Recorder()
    trainer, module, dm = make_run(
        root=tmp_path / "local",
        model=model,
        data={**data, "refine": refine, "rollout": GREEDY},
        callbacks=[local_keep, local_rec],
        max_steps=3,
    )
    L.seed_everything(0)
    trainer.fit(module, dm)
    served_data = {**data, "refine": {**refine, "url": student_server.url, "service": QUICK}}
    twin, keep, rec, _ = served_run(make_run, tmp_path / "served", student_server.url, model, served_data)
    assert twin.differing == 0
    for a, b in zip(keep.batches, local_keep.batches):
        assert a.produced.refined_text == b.produced.refined_text and a.produced.refined.all()
    assert rec.losses == pytest.approx(local_rec.losses, rel=1e-5)


class KillAtStep(L.Callback):
    def __init__(self, server: Server, step: int) -> None:
        self.server, self.step = server, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:  # while the next step's rollouts are being made
            self.server.kill()


def test_an_engine_that_dies_under_overlap_stops_with_a_checkpoint_and_no_step_is_lost(make_run, tiny, tmp_path):
    """The engine dies while step 2's batch is made in the background: the error reaches the training loop at step 2,
    the checkpoint holds the state after step 1, and the resumed run trains steps 2 and 3 on the prompts the
    uninterrupted run trained them on (its first resumed step is made synchronously, from the restored weights)."""
    server = Server(tiny["student"], tmp_path / "serve.log").start().wait()
    try:
        data = {"rollout": {"max_staleness": 1, "service": ServiceOptions(timeout=20, retries=1, backoff=0.2)}}
        _, full_keep, _, _ = served_run(make_run, tmp_path / "full", server.url, data={**data})
        saver = ServiceFailureCheckpoint(str(tmp_path / "saved"))
        with pytest.raises(ServiceError, match=r"\(data.rollout.url\)"):
            served_run(make_run, tmp_path / "cut", server.url, data={**data}, callbacks=[KillAtStep(server, 1), saver])
        saved = tmp_path / "saved" / "service-failure-step=1.ckpt"
        assert saver.path == saved and saved.is_file()

        server.start().wait()
        keep = KeepBatch()
        rollout = {**GREEDY, "url": server.url, **data["rollout"]}
        trainer, module, dm = make_run(
            root=tmp_path / "resumed", model=FAST, data={"rollout": rollout}, callbacks=[keep], max_steps=3
        )
        trainer.fit(module, dm, ckpt_path=str(saved))
        assert trainer.global_step == 3
        assert [b.index.tolist() for b in keep.batches] == [b.index.tolist() for b in full_keep.batches[1:]]
        assert [int(b.produced.weight_version[0]) for b in keep.batches] == [1, 1]
        assert any(isinstance(c, ServiceFailureCheckpoint) for c in trainer.callbacks)  # the module adds one
    finally:
        server.stop()


def test_trd_fit_with_the_served_rollouts_overlay(student_server, tiny, tmp_path):
    """``trd fit`` with ``configs/demo_rollouts_served.yaml`` (served, synced, overlapped) on the tiny run."""
    overlay = str(CONFIGS[0].parent / "demo_rollouts_served.yaml")
    run = trd(
        "fit",
        *demo_on_tiny(tiny),
        "--config",
        overlay,
        f"--data.rollout.url={student_server.url}",
        "--data.validation.split=null",
        "--data.rollout.max_new_tokens=8",
        "--trainer.max_steps=3",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    curves = scalars(tmp_path / "demo_opd_served_overlap" / "version_0")
    assert [v for _, v in curves["rollout/staleness"]] == [0.0, 1.0, 1.0]
    assert [v for _, v in curves["rollout/weight_version"]] == [0.0, 0.0, 1.0]
    assert all(v > 0 for _, v in curves["perf/sync_seconds"][1:])
