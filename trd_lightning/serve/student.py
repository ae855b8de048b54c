"""The student's rollouts from a served engine (``data.rollout.url``), its weights brought up to date before each
round of generation.

After every optimizer step the engine must generate from the student's new weights. ``WeightSync`` writes them to a
directory the engine can read and asks it to load them, with vLLM's own calls (``trd serve`` answers the same):

- a LoRA student: the adapter (peft's ``save_pretrained``) and ``POST /v1/load_lora_adapter {lora_name, lora_path,
  load_inplace: true}``; requests then name the adapter, and the base model stays what the engine was started with
  (a TRD-OPSD run's refiner, when one server holds both);
- a full student: ``save_pretrained``'s safetensors and ``POST /collective_rpc {method: reload_weights, kwargs:
  {weights_path}}``, then ``POST /reset_prefix_cache`` (vLLM serves both with ``VLLM_SERVER_DEV_MODE=1`` only).

Each version goes to a new folder, written under a temporary name and renamed when complete, so the engine never
reads half a save; the folder of the version before is removed once the engine has the new one.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from torch import nn

from trd_lightning.serve.client import ServiceClient
from trd_lightning.serve.generator import ServedEngine, connect
from trd_lightning.serve.options import ServiceError

# What a server that refuses a weight update must be started with.
_LORA_FIX = (
    "start vLLM with --enable-lora --max-lora-rank R (R at least the adapter's rank) and "
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
)
_FULL_FIX = "start vLLM with VLLM_SERVER_DEV_MODE=1 (it serves /collective_rpc and /reset_prefix_cache only then)"


class WeightSync:
    """Brings the engine behind ``client`` to the student's weights of a given version (optimizer steps taken).

    Args:
        client: the engine's client; for a LoRA student its requests name the adapter once it is loaded.
        directory: where the weights are written, a folder the engine can read; None: a new temporary folder
            (an engine on this machine).
        adapter: the name the engine serves a LoRA student's adapter under.
    """

    def __init__(self, client: ServiceClient, directory: str | None, adapter: str) -> None:
        self.client, self.adapter = client, adapter
        self.directory = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="trd-student-weights-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.version: int | None = None  # the version the engine has

    def push(self, model: nn.Module, version: int) -> float:
        """Make the engine generate from ``model`` (the student at ``version``); returns the seconds it took (0 when
        the engine had that version already)."""
        if version == self.version:
            return 0.0
        start = time.perf_counter()
        lora = hasattr(model, "peft_config")
        target = self.directory / f"v{version:07d}"
        partial = self.directory / f".v{version:07d}.partial"
        for stale in (partial, target):  # left by an interrupted run
            shutil.rmtree(stale, ignore_errors=True)
        model.save_pretrained(partial)  # peft writes the adapter alone, transformers the whole model's safetensors
        partial.rename(target)
        try:
            if lora:
                body = {"lora_name": self.adapter, "lora_path": str(target), "load_inplace": True}
                self.client.request("POST", "/v1/load_lora_adapter", body, text=True)
                self.client.model = self.adapter
            else:
                body = {"method": "reload_weights", "kwargs": {"weights_path": str(target)}}
                self.client.request("POST", "/collective_rpc", body, text=True)
                # Cached prefixes hold the old weights' keys and values (a LoRA request's are keyed by its adapter).
                self.client.request("POST", "/reset_prefix_cache", text=True)
        except ServiceError as error:
            fix = _LORA_FIX if lora else _FULL_FIX
            raise ServiceError(
                self.client.url, f"{error}\nThe engine did not take the student's weights: {fix}."
            ) from error
        if self.version is not None:
            shutil.rmtree(self.directory / f"v{self.version:07d}", ignore_errors=True)
        self.version = version
        return time.perf_counter() - start


def connect_student(rollout, tokenizer, student: str, needed: int, world_size: int) -> tuple[ServedEngine, WeightSync]:
    """The student's engine (``rollout``: the DataModule's ``RolloutOptions``) and its weight sync, checked (up, the
    same tokenizer, ``needed`` positions: the longest prompt and rollout) before any weights load."""
    if world_size > 1:
        raise ValueError("data.rollout.url serves one process's rollouts for now: run on one device, or drop it.")
    engine = connect(rollout.url, rollout.service, tokenizer, student, needed, "data.rollout.url")
    return engine, WeightSync(engine.client, rollout.sync_dir, rollout.adapter_name)
