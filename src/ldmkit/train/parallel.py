"""Distribution and compilation, applied to a plain model from outside (as torchtitan's parallelize.py).

`torchrun` sets RANK/WORLD_SIZE/LOCAL_RANK; the process group is NCCL on GPUs and gloo on the CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str = "auto", process_group: bool = True) -> Dist:
    """This process's rank and device from torchrun's variables; with process_group, also join the group
    (training). `ldmkit encode` needs none: its processes share only the file system."""
    cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
    if device_pref == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no GPU is visible")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if process_group and world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, local, device)


def all_reduce_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world_size > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= d.world_size
    return x


def barrier(d: Dist) -> None:
    if d.world_size > 1:
        dist.barrier()


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
