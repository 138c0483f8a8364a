"""Memory per GPU before a run starts (`ldmkit plan`): the training state by parallel mode, and the activations of
one micro-batch with and without activation checkpointing, computed on the meta device (no memory, no weights).

State per parameter, fp32 master weights: weights 4 bytes, gradients 4, optimizer (AdamW 8, Adan 16), EMA 4.
`ddp` holds all of it on every GPU, plus DDP's gradient buckets (another 4 bytes per parameter) when there are
several processes; `fsdp` divides it by the number of processes, `hsdp` by train.shard_size, and adds the largest
block's parameters gathered for its forward (twice: the next block is prefetched). Activations are the bytes
autograd keeps for backward in one forward pass of a micro-batch (both passes for MDT-v2), counted with
saved-tensor hooks on the meta device, with attention counted as a fused kernel keeps it; with activation
checkpointing, plus one block's recomputed activations. bf16 counts every kept
tensor in bf16; autocast keeps a few in fp32 (norm and softmax statistics), so it keeps somewhat more. Not
counted: the autoencoder and text encoder (absent when training from the cache), the CUDA context (about 0.5 GB)
and allocator fragmentation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..conditioning.cond import Cond
from ..config import CONTROL_SIZES, RunConfig
from ..models.registry import build_model, spec_of
from . import parallel

GB = 2**30
OPTIMIZER_BYTES = {"adamw": 8, "adan": 16}


@dataclass
class Plan:
    mode: str
    activation_checkpointing: str
    parameters: int
    weights: float  # bytes per GPU
    gradients: float
    optimizer: float
    ema: float
    buffers: float  # DDP's gradient buckets, or FSDP's gathered blocks
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.ema + self.buffers + self.activations


def meta_inputs(cfg: RunConfig, batch: int, device="meta") -> tuple[torch.Tensor, torch.Tensor, Cond]:
    """A micro-batch of latents, noise levels and conditions (on the meta device: shapes only), shaped as training
    feeds them."""
    m, meta = cfg.model, torch.device(device)
    x = torch.randn(batch, m.in_channels, m.input_size, m.input_size, device=meta)
    t = torch.rand(batch, device=meta)
    size = float(cfg.data.resolution)
    control = {k: torch.full((batch, n), size, device=meta) for k, n in CONTROL_SIZES.items()}
    if m.conditioning == "class":
        cond = Cond(class_labels=torch.zeros(batch, dtype=torch.long, device=meta), control=control)
    else:
        length = cfg.text.max_length
        cond = Cond(
            context=torch.randn(batch, length, m.context_dim, device=meta),
            context_mask=torch.ones(batch, length, dtype=torch.bool, device=meta),
            pooled=torch.randn(batch, m.pooled_dim, device=meta),
            control=control,
        )
    return x, t, cond


class FusedAttention(TorchFunctionMode):
    """Attention as a fused kernel (FlashAttention, cuDNN, PyTorch's CPU flash kernel) keeps it for backward:
    queries, keys, values, output and one statistic per row, not the T x T probabilities that the meta device's
    reference implementation keeps. Runs PyTorch's CPU flash-attention op, which has meta shapes."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
            return flash(q, k, v, attn_mask=mask, scale=kwargs.get("scale"))[0]
        return func(*args, **kwargs)


def activation_bytes(cfg: RunConfig, model: torch.nn.Module, batch: int, dtype: torch.dtype) -> int:
    """Bytes autograd keeps from one training forward of `batch` samples (meta tensors: nothing is computed)."""
    total = 0

    def keep(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    x, t, cond = meta_inputs(cfg, batch)
    x = x.to(dtype)
    cond = cond.map(lambda v: v.to(dtype) if v.is_floating_point() else v)
    passes = [{}]
    extra = spec_of(model).extra_pass(model)
    if extra is not None:  # MDT-v2's masked pass runs on the same batch
        drawn = extra.draw(batch, torch.Generator().manual_seed(0), "cpu").to("meta")
        passes.append(extra.kwargs(drawn, slice(0, batch)))
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), FusedAttention():
        for kwargs in passes:
            model(x, t, cond, **kwargs)
    return total


def plan_memory(cfg: RunConfig, gpus: int, micro_batch: int | None = None) -> list[Plan]:
    """The memory per GPU of each parallel mode x activation checkpointing setting for this config on `gpus`
    processes (hsdp: shards of train.shard_size, default 8 per node)."""
    tc = cfg.train
    micro = micro_batch or tc.micro_batch or max(tc.global_batch // gpus, 1)
    with torch.device("meta"):
        base = build_model(cfg.model, cfg.conditioning)
    parameters = sum(p.numel() for p in base.parameters())
    largest_block = max((sum(p.numel() for p in b.parameters()) for b in parallel.repeated_blocks(base)), default=0)
    dtype = torch.bfloat16 if tc.precision in ("bf16", "fp8") else torch.float32  # fp8: bf16 activations, a bound
    activations = {}
    for ac in ("none", "selective", "blocks"):
        model = copy.deepcopy(base)
        wrapped = parallel.apply_activation_checkpointing(model, ac, tc.ac_every)
        activations[ac] = activation_bytes(cfg, model.to(dtype), micro, dtype)
        if wrapped:  # in backward, one checkpointed block at a time holds its recomputed activations again
            activations[ac] += (activations["none"] - activations[ac]) // wrapped
    plans = []
    shard_size = tc.shard_size or min(gpus, 8)
    for mode, shards in (("ddp", 1), ("fsdp", gpus), ("hsdp", shard_size)):
        if mode == "hsdp" and (gpus % shard_size or gpus == shard_size):
            continue
        state = parameters / shards
        if mode == "ddp":
            buffers = 4 * parameters if gpus > 1 else 0
        else:
            buffers = 2 * largest_block * (2 if dtype == torch.bfloat16 else 4)
        for ac, kept in activations.items():
            plans.append(
                Plan(
                    mode=mode,
                    activation_checkpointing=ac,
                    parameters=parameters,
                    weights=4 * state,
                    gradients=4 * state,
                    optimizer=OPTIMIZER_BYTES[tc.optimizer] * state,
                    ema=4 * state,
                    buffers=buffers,
                    activations=kept,
                )
            )
    return plans


def plan_table(cfg: RunConfig, gpus: int, gpu_memory_gb: float, micro_batch: int | None = None) -> str:
    """The plan as text: one row per mode and checkpointing setting, and whether it fits."""
    plans = plan_memory(cfg, gpus, micro_batch)
    micro = micro_batch or cfg.train.micro_batch or max(cfg.train.global_batch // gpus, 1)
    lines = [
        f"{cfg.model.name} {cfg.model.preset}: {plans[0].parameters / 1e6:,.1f}M parameters, {cfg.train.optimizer}, "
        f"{cfg.train.precision}, micro-batch {micro} per GPU, {gpus} GPU(s) of {gpu_memory_gb:g} GB",
        f"{'mode':5s} {'act. ckpt':9s} {'weights':>8s} {'grads':>8s} {'optim':>8s} {'EMA':>8s} {'buffers':>8s} "
        f"{'activ.':>8s} {'total':>8s}  (GB per GPU)",
    ]
    for p in plans:
        values = (p.weights, p.gradients, p.optimizer, p.ema, p.buffers, p.activations, p.total)
        verdict = "fits" if p.total <= gpu_memory_gb * GB else "does not fit"
        figures = " ".join(f"{v / GB:8.2f}" for v in values)
        lines.append(f"{p.mode:5s} {p.activation_checkpointing:9s} {figures}  {verdict}")
    lines.append("Not counted: the autoencoder and text encoder, the CUDA context (about 0.5 GB), fragmentation.")
    return "\n".join(lines)
