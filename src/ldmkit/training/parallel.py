"""Activation checkpointing, compilation and distribution, applied to a plain model from outside, in that order
(as torchtitan's parallelize.py). Process groups themselves are set up in ldmkit.distributed.

- `ddp` (train.parallel): every process holds the whole model; gradients are averaged by DistributedDataParallel.
- `fsdp`: PyTorch's FSDP2 (`fully_shard`) on each repeated block and on the root over a 1-D mesh of all
  processes: parameters, gradients and optimizer state are sharded, and a block's parameters are gathered just
  for its forward and backward. With train.precision bf16 the gathered parameters are bf16 and gradients are
  reduced in fp32 (MixedPrecisionPolicy).
- `hsdp`: the same over a 2-D mesh: shards within a group of train.shard_size processes (default: one node), and
  replicas across the groups.
The EMA is sharded like the model, so that its update is a local lerp of shards (no gathering).
"""

from __future__ import annotations

import contextlib
import copy
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..config import ConfigError
from ..distributed import Dist
from ..models.registry import spec_of

SHARDED_MODES = ("fsdp", "hsdp")


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks that compile, activation checkpointing and sharding wrap, as the backbone's spec lists them."""
    return spec_of(model).blocks(model)


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each repeated block in place (shorter compiles than the whole model, and the same
    compiled code serves every block of one shape)."""
    for block in repeated_blocks(model):
        block.compile()


def checkpointed_blocks(model: nn.Module, mode: str, every: int = 2) -> list[nn.Module]:
    """The blocks whose activations are recomputed in backward: all (blocks), every k-th (selective), none."""
    blocks = repeated_blocks(model)
    if mode == "blocks":
        return blocks
    if mode == "selective":
        return blocks[every - 1 :: every]
    return []


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 2) -> int:
    """Keep only each chosen block's inputs in forward and recompute the rest in backward (non-reentrant
    torch.utils.checkpoint, which composes with torch.compile and FSDP2). Returns how many blocks it wraps."""
    chosen = checkpointed_blocks(model, mode, every)
    for block in chosen:
        forward = block.forward

        def recomputed(*args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = recomputed
    return len(chosen)


def device_mesh(d: Dist, tc):
    """The mesh FSDP shards over: (processes,) for fsdp; (replicas, train.shard_size) for hsdp. A single process
    gets a one-process group of its own."""
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():  # one process, not launched by torchrun
        backend = "nccl" if d.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    device_type = d.device.type
    if tc.parallel == "fsdp":
        return init_device_mesh(device_type, (d.world_size,), mesh_dim_names=("shard",))
    shard = tc.shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", d.world_size))
    if d.world_size % shard:
        raise ConfigError(
            f"config key 'train.shard_size': {shard} does not divide the {d.world_size} processes (hsdp shards within "
            "groups of shard_size processes and replicates across them)"
        )
    return init_device_mesh(device_type, (d.world_size // shard, shard), mesh_dim_names=("replicate", "shard"))


def shard(model: nn.Module, mesh, bf16: bool) -> None:
    """fully_shard each repeated block, then the root (which holds the embedders and the final layer)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mesh": mesh, **({"mp_policy": policy} if policy else {})}
    for block in repeated_blocks(model):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


# Linear layers of a block that map the per-image condition vector (one row per image, not per token): too small
# for float8 to pay, and the modulation is precision-sensitive; they stay bf16.
CONDITION_LINEARS = ("adaLN_modulation", "time_emb_proj")


def apply_float8(model: nn.Module) -> int:
    """train.precision fp8: torchao's float8 training (dynamic tensorwise scales, e4m3 activations and weights, e5m2
    gradients) on the token-wise Linear layers of the repeated blocks whose sides are multiples of 16 (what float8
    matmuls take); the adaLN modulations, embedders, the final layer and the rest run under bf16 autocast. The
    weights stay fp32 (float8 is computed per matmul), so checkpoints and the EMA are unchanged. Returns how many
    layers it converted."""
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise ConfigError("config key 'train.precision': fp8 needs torchao (pip install 'ldmkit[fp8]')") from None
    inside = {id(m) for block in repeated_blocks(model) for m in block.modules()}
    chosen = {
        id(m)
        for name, m in model.named_modules()
        if id(m) in inside
        and type(m) is nn.Linear
        and m.in_features % 16 == 0
        and m.out_features % 16 == 0
        and not any(part in name for part in CONDITION_LINEARS)
    }
    convert_to_float8_training(model, module_filter_fn=lambda module, fqn: id(module) in chosen)
    return len(chosen)


def parallelize(model: nn.Module, ema, d: Dist, tc) -> nn.Module:
    """Float8 layers, activation checkpointing, compilation, then DDP or sharding (of the EMA too) as train.parallel
    says (torchtitan's order). Returns the module to call in training."""
    if tc.precision == "fp8":
        apply_float8(model)
    apply_activation_checkpointing(model, tc.activation_checkpointing, tc.ac_every)
    if tc.compile:
        compile_blocks(model)
    if tc.parallel in SHARDED_MODES:
        mesh = device_mesh(d, tc)
        ema.plain = copy.deepcopy(ema.model).cpu()  # an unsharded copy for evaluation on process 0
        shard(model, mesh, tc.precision in ("bf16", "fp8"))
        shard(ema.model, mesh, bf16=False)
        return model
    if d.world_size > 1:
        ids = [d.device.index] if d.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


def is_fsdp(model: nn.Module) -> bool:
    """Whether fully_shard wraps the model (not to be confused with checkpoint.is_sharded, a DCP folder)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gradient_sync(train_model: nn.Module, sync: bool):
    """A context for one micro-batch's backward: gradients are synchronised across processes only when sync
    (the last micro-batch of a step); earlier ones accumulate locally."""
    if isinstance(train_model, nn.parallel.DistributedDataParallel) and not sync:
        return train_model.no_sync()
    if is_fsdp(train_model):
        train_model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def local(tensors) -> list[torch.Tensor]:
    """This process's part of each tensor (its shard of a sharded one)."""
    from torch.distributed.tensor import DTensor

    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def full_value(x: torch.Tensor) -> torch.Tensor:
    """A reduction over sharded tensors (a DTensor) as the plain global value."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x
