"""A served refiner killed mid-run: the run retries, stops with a checkpoint, and the run resumed from it (once the
service is back) gives the uninterrupted run's losses."""

from __future__ import annotations

import lightning as L
import pytest
from fixtures.serving import Server
from helpers import Recorder

from trd_lightning.serve import ServiceError, ServiceFailureCheckpoint, ServiceOptions


class KillAtStep(L.Callback):
    """Kills the server as step ``step`` starts (callback hooks run before the module's, so before its rollouts)."""

    def __init__(self, server: Server, step: int) -> None:
        self.server, self.step = server, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.server.kill()


def test_a_service_killed_mid_run_stops_with_a_checkpoint_that_resumes_to_the_same_losses(make_run, tiny, tmp_path):
    server = Server(tiny["teacher"], tmp_path / "serve.log").start().wait()
    try:
        service = ServiceOptions(timeout=30, retries=2, backoff=0.2)
        data = {"refine": {"enabled": True, "temperature": 0.7, "url": server.url, "service": service}}
        full = Recorder()
        trainer, module, dm = make_run(root=tmp_path / "full", data=data, callbacks=[full], max_steps=3)
        trainer.fit(module, dm)

        cut = Recorder()
        trainer, module, dm = make_run(
            root=tmp_path / "cut", data=data, callbacks=[cut, KillAtStep(server, 1)], max_steps=3
        )
        with pytest.raises(
            ServiceError, match=f"{server.url} \\(data.refine.url\\) failed POST /v1/completions 3 times"
        ):
            trainer.fit(module, dm)
        (saver,) = [c for c in trainer.callbacks if isinstance(c, ServiceFailureCheckpoint)]  # added by the module
        assert saver.path == tmp_path / "cut" / "checkpoints" / "service-failure-step=1.ckpt" and saver.path.is_file()
        assert cut.losses == {1: full.losses[1]}  # the first step ran; the second never reached its optimizer step

        server.start().wait()  # the service is back, on the same address
        resumed = Recorder()
        trainer, module, dm = make_run(root=tmp_path / "resumed", data=data, callbacks=[resumed], max_steps=3)
        trainer.fit(module, dm, ckpt_path=str(saver.path))
        assert sorted(resumed.losses) == [2, 3]
        for step in (2, 3):
            assert resumed.losses[step] == pytest.approx(full.losses[step], rel=1e-5, abs=1e-7)
    finally:
        server.stop()
