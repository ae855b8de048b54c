"""ExportStudent with a LoRA student: merged weights or the adapter alone, each loading back to the trained model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from trd_lightning import ExportStudent
from trd_lightning.lora import LoraOptions


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "adapter"])
def test_lora_student_exports_merged_or_as_adapter(make_run, tiny, tmp_path, merge):
    out = tmp_path / "export"
    trainer, module, dm = make_run(
        model={"lora": LoraOptions(r=4, alpha=8), "lr": 1e-2},
        callbacks=[ExportStudent(str(out), merge_lora=merge)],
        max_steps=2,
    )
    trainer.fit(module, dm)
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = module.student(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny["student"]).eval()
        assert not torch.allclose(base(ids).logits, trained, atol=1e-4)  # the adapter learned something
        if merge:
            assert not (out / "adapter_config.json").exists()
            exported = AutoModelForCausalLM.from_pretrained(out).eval()
        else:
            from peft import PeftModel

            assert (out / "adapter_config.json").exists() and not (out / "model.safetensors").exists()
            exported = PeftModel.from_pretrained(base, out).eval()
        assert torch.allclose(exported(ids).logits, trained, atol=1e-5)
    assert (out / "tokenizer.json").exists()
