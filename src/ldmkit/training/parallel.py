"""Distribution and compilation, applied to a plain model from outside (as torchtitan's parallelize.py).
Process groups themselves are set up in ldmkit.distributed."""

from __future__ import annotations

import torch.nn as nn

from ..distributed import Dist
from ..models.registry import spec_of


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks that compile, activation checkpointing and sharding wrap, as the backbone's spec lists them."""
    return spec_of(model).blocks(model)


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each repeated block in place (shorter compiles than the whole model, and the same
    compiled code serves every block of one shape)."""
    for block in repeated_blocks(model):
        block.compile()


def parallelize(model: nn.Module, d: Dist, compile: bool = False) -> nn.Module:
    """Compile (optional), then wrap in DDP when several processes run. Returns the module to call."""
    if compile:
        compile_blocks(model)
    if d.world_size > 1:
        ids = [d.device.index] if d.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model
