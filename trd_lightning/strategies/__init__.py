"""Sharding strategies."""

from trd_lightning.strategies.fsdp import FSDP2Strategy

__all__ = ["FSDP2Strategy"]
