"""Distribution and compilation, applied to a plain model from outside (as torchtitan's parallelize.py).
Process groups themselves are set up in ldmkit.distributed."""
from __future__ import annotations

import torch.nn as nn

from ..distributed import Dist


# The repeated blocks of each backbone: DiT/PixArt blocks, mmDiT joint_blocks, MDT's encoder/decoder/side
# blocks, the UNet's down/up blocks and middle block.
REPEATED_BLOCKS = ("blocks", "joint_blocks", "en_inblocks", "en_outblocks", "de_blocks", "sideblocks", "down_blocks", "up_blocks")


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    blocks = [b for name in REPEATED_BLOCKS for b in getattr(model, name, [])]
    if hasattr(model, "mid_block"):
        blocks.append(model.mid_block)
    return blocks


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
