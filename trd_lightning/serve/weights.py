"""The server's weight updates: what ``trd serve`` does on vLLM's two calls for a trained student's new weights.

- ``POST /v1/load_lora_adapter {lora_name, lora_path, load_inplace}``: a peft adapter directory is loaded under
  ``lora_name`` (in place when that name is loaded already); requests naming it generate with the adapter, requests
  naming the base model without it. One server can so hold a TRD-OPSD run's refiner (the base) and its student.
- ``POST /collective_rpc {method: reload_weights, kwargs: {weights_path}}``: the model's weights are replaced by the
  safetensors files of a directory (``save_pretrained``'s output).

Both run on the batching worker's thread between batches, so no batch sees half-loaded weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from trd_lightning.serve.protocol import BadRequest


def load_adapter(model: nn.Module, name: str, path: str) -> nn.Module:
    """``model`` with the adapter at ``path`` loaded as ``name``; returns the (possibly newly wrapped) model."""
    from peft import PeftModel, set_peft_model_state_dict

    folder = Path(path)
    weights = folder / "adapter_model.safetensors"
    if not (folder / "adapter_config.json").is_file() or not weights.is_file():
        raise BadRequest(
            f"{path} holds no peft adapter (adapter_config.json and adapter_model.safetensors): save the adapter "
            "with save_pretrained.",
            "lora_path",
        )
    if not isinstance(model, PeftModel):
        model = PeftModel.from_pretrained(model, str(folder), adapter_name=name, is_trainable=False)
    elif name not in model.peft_config:
        model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
    else:
        state = load_file(str(weights), device=str(_device(model)))
        result = set_peft_model_state_dict(model, state, adapter_name=name)
        if getattr(result, "unexpected_keys", None):
            raise BadRequest(f"The adapter at {path} does not fit the one loaded as {name!r}.", "lora_path")
    return model.eval().requires_grad_(False)


def adapters(model: nn.Module) -> list[str]:
    """The adapter names loaded on ``model``."""
    return list(getattr(model, "peft_config", {}) or {})


def reload_weights(model: nn.Module, path: str) -> None:
    """Replace ``model``'s weights with the safetensors files in ``path``; every weight must be there (a tied output
    head may be absent) and nothing else."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise BadRequest(f"{path} holds no .safetensors files: save the weights with save_pretrained.", "weights_path")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file), device=str(_device(model))))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    own = base.state_dict()
    unknown = sorted(set(state) - set(own))
    tied = {"lm_head.weight"} if getattr(base.config, "tie_word_embeddings", False) else set()
    missing = sorted(set(own) - set(state) - tied - _adapter_keys(own))
    if unknown or missing:
        raise BadRequest(
            f"The weights at {path} do not fit the served model: unknown {unknown[:3]}, missing {missing[:3]}.",
            "weights_path",
        )
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value.to(own[key].dtype))


def _adapter_keys(state: dict) -> set[str]:
    return {k for k in state if "lora_" in k}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
