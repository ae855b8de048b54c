"""Option groups from Python: exported from the package, and given as plain dicts or refused by name."""

from __future__ import annotations

import pytest

import trd_lightning
from trd_lightning import DistillationModule, OnPolicyDataModule, RefineOptions, ServiceOptions, ValidationOptions


def test_the_option_classes_are_exported():
    for name in ("PromptOptions", "RolloutOptions", "RefineOptions", "ValidationOptions", "CodeOptions"):
        assert name in trd_lightning.__all__ and isinstance(getattr(trd_lightning, name), type)
    assert {"LoraOptions", "ServiceOptions", "Limits"} <= set(trd_lightning.__all__)


def test_a_dict_is_built_into_its_group_nested_groups_too():
    data = OnPolicyDataModule(
        refine={"enabled": True, "max_prompt_length": 100, "service": {"timeout": 5.0}},
        validation={"batch_size": 4, "samples": 2},
    )
    assert data.refine == RefineOptions(enabled=True, max_prompt_length=100, service=ServiceOptions(timeout=5.0))
    assert data.validation == ValidationOptions(batch_size=4, samples=2)
    module = DistillationModule(lora={"r": 4, "alpha": 8}, teacher_service={"retries": 1})
    assert (module.lora_options.r, module.lora_options.alpha) == (4, 8) and module.teacher_service.retries == 1


def test_a_wrong_setting_in_a_dict_is_refused_with_the_nearest_one():
    with pytest.raises(ValueError, match=r"data.refine has no setting 'max_promt_length' \(did you mean 'max_prompt"):
        OnPolicyDataModule(refine={"max_promt_length": 3})
    with pytest.raises(ValueError, match=r"data.refine.service has no setting 'timout'"):
        OnPolicyDataModule(refine={"service": {"timout": 3}})
    with pytest.raises(TypeError, match="data.rollout must be a RolloutOptions or a dict of its settings, got int"):
        OnPolicyDataModule(rollout=5)
    with pytest.raises(ValueError, match="data.validation.batch_size must be at least 1"):  # the group's own checks
        OnPolicyDataModule(validation={"batch_size": 0})


def test_the_default_refine_budget_fits_the_default_models():
    """With the library's defaults, the refine prompt's budget plus the rewrite fits the demo models' positions."""
    from trd_lightning.hf import load_config

    refine, positions = RefineOptions(), load_config("trd-demo/student").max_position_embeddings
    rollout = OnPolicyDataModule().rollout
    assert refine.max_prompt_length + refine.sampling(rollout).max_new_tokens <= positions
