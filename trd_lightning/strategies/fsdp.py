"""Sharding the student and the teacher with FSDP2, through Lightning's ``ModelParallelStrategy``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.strategies.model_parallel import _load_checkpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from transformers import PreTrainedModel


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel training (FSDP2) of the student, with the teacher sharded the same way.

    One block of the config turns it on::

        trainer:
          strategy:
            class_path: trd_lightning.FSDP2Strategy
            init_args: {activation_checkpointing: true, mixed_precision: true}

    Why a strategy and not a callback: the models must be sharded after the LightningModule's
    ``configure_model`` has loaded them and before the optimizer is built over their parameters, which is
    exactly where ``Strategy.setup`` runs (callbacks' ``setup`` runs before ``configure_model``); and only the
    strategy chooses what a checkpoint is loaded into.

    The plan, for every Hugging Face model the LightningModule holds as a child (the student, a separate or
    copied teacher): ``fully_shard`` on each decoder layer (the classes the model lists in
    ``_no_split_modules``), then on the model itself, whose group keeps the rest (embeddings, final norm,
    output head). The teacher is sharded too but has no trainable parameters, so it never enters the optimizer
    and holds no optimizer state.

    FSDP2 gathers a group's parameters in that group's forward. Generation runs the model's forward, so
    rollouts and refinement work from any hook. ``DistillationModule`` instead calls the decoder and then the
    output head chunk by chunk (``trd_lightning.hf.last_hidden``, ``output_head``), never the model's forward:
    so the model-level group is also gathered before those two calls, and FSDP2 reduce-scatters its gradients
    at the end of backward, as it does for any group whose forward inputs need no gradient. A model used
    without backward (the teacher) keeps that group gathered until the next optimizer step, where every model
    is put back in shards so that code after the step (the EMA teacher update) sees sharded parameters.

    Checkpoints hold the LightningModule's children except those its ``checkpoint_excludes()`` names
    (``DistillationModule``: the teacher, reloaded from its source, unless it is an EMA teacher):
    ``save_distributed_checkpoint: true`` writes a folder with one shard file per process (torch distributed
    checkpoint), ``false`` a single file of full weights gathered on rank 0. Both resume, on any number of
    processes for the folder form.

    Every process loads the models and FSDP2 keeps each process's own slice: weights drawn at random (a new LoRA
    adapter) must be drawn alike, with the same seed on every process (``seed_everything``, which the shipped
    configs set). All processes form one data-parallel dimension (no tensor parallelism). On CPU, use
    ``accelerator: cpu`` and ``process_group_backend: gloo``.

    Args:
        activation_checkpointing: recompute each decoder layer of the trainable models in backward
            (Hugging Face's non-reentrant activation checkpointing, the same as ``model.gradient_checkpointing``).
        mixed_precision: compute in bfloat16 (parameters are gathered in bf16) while the sharded weights, the
            optimizer state and the gradient reduction stay in float32 (FSDP2 ``MixedPrecisionPolicy``).
        save_distributed_checkpoint: write sharded checkpoints (a folder) instead of one file with full weights.
        process_group_backend: the collective backend; ``nccl`` is the default on GPUs, ``gloo`` on CPU.
    """

    def __init__(
        self,
        activation_checkpointing: bool = False,
        mixed_precision: bool = False,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
    ) -> None:
        super().__init__(
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )
        self.activation_checkpointing = activation_checkpointing
        self.mixed_precision = mixed_precision

    def setup_environment(self) -> None:
        # ModelParallelStrategy's "auto" data-parallel size is the node count; here every process shards.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def setup(self, trainer) -> None:
        for model in self._hf_children():
            if not isinstance(_root_model(model), FSDPModule):  # set up again (validate after fit): already sharded
                self._shard(model)
        super().setup(trainer)

    def optimizer_step(self, optimizer, closure, model=None, **kwargs: Any) -> Any:
        # A model used without backward is still gathered; code after the step must see the shards (the EMA update).
        for sharded in self._hf_children():
            _reshard(sharded)
        return super().optimizer_step(optimizer, closure, model, **kwargs)

    # ------------------------------------------------------------- sharding
    def _hf_children(self) -> list[nn.Module]:
        """The LightningModule's children that are (or wrap, as peft does) a Hugging Face model."""
        return [c for c in self.lightning_module.children() if _root_model(c) is not None]

    def _shard(self, model: nn.Module) -> None:
        root = _root_model(model)
        layer_names = {
            name for m in root.modules() if isinstance(m, PreTrainedModel) for name in m._no_split_modules or []
        }
        layers = [m for m in root.modules() if type(m).__name__ in layer_names]
        if not layers:
            raise ValueError(
                f"FSDP2Strategy found no decoder layers to shard in {type(root).__name__}: its _no_split_modules "
                f"lists {sorted(layer_names) or 'nothing'}."
            )
        if self.activation_checkpointing and any(p.requires_grad for p in root.parameters()):
            root.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        mesh = self.device_mesh["data_parallel"]
        policy = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if self.mixed_precision else MixedPrecisionPolicy()
        # Bottom-up (reversed pre-order), so that a layer class nested in another still gets its own group.
        for layer in reversed(layers):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(root, mesh=mesh, mp_policy=policy)

        def gather(*_) -> None:
            root.unshard()  # a no-op while it is gathered

        root.get_decoder().register_forward_pre_hook(gather)
        root.get_output_embeddings().register_forward_pre_hook(gather)
        # FSDP2 takes the first module to run forward as the root of its tree: make that the model itself, before
        # a direct call of the decoder makes a layer the root.
        with torch.no_grad():
            root(input_ids=torch.zeros((1, 1), dtype=torch.long, device=self.root_device), use_cache=False)
        _reshard(model)

    # ----------------------------------------------------------- checkpoints
    def _checkpointed(self) -> nn.Module:
        """The part of the LightningModule that checkpoints hold, with the same key names."""
        module = self.lightning_module
        excluded = set(module.checkpoint_excludes()) if hasattr(module, "checkpoint_excludes") else set()
        if not excluded:
            return module
        return nn.ModuleDict({name: child for name, child in module.named_children() if name not in excluded})

    def lightning_module_state_dict(self) -> dict[str, Any]:
        options = StateDictOptions(full_state_dict=not self._save_distributed_checkpoint, cpu_offload=True)
        return get_model_state_dict(self._checkpointed(), options=options)

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        options = StateDictOptions(full_state_dict=not self._save_distributed_checkpoint, cpu_offload=True)
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wraps the torch optimizer
        # Keyed by parameter name, on the same module the loader uses, whichever children come first.
        return get_optimizer_state_dict(self._checkpointed(), optimizer, options=options)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        state = {"state_dict": self._checkpointed(), **{f"optimizer_{i}": o for i, o in enumerate(self.optimizers)}}
        return _load_checkpoint(
            path=path,
            state=state,
            strict=self.lightning_module.strict_loading,
            optimizer_states_from_list=True,
            weights_only=weights_only,
        )


def _root_model(module: nn.Module) -> PreTrainedModel | None:
    """The outermost Hugging Face model in ``module`` (the module itself, or the base model inside a peft wrapper)."""
    return next((m for m in module.modules() if isinstance(m, PreTrainedModel)), None)


def _reshard(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
