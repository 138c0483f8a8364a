"""The latent-diffusion UNet (Rombach et al., 2022) and its SDXL configuration (Podell et al., 2023), after
CompVis/latent-diffusion's openaimodel.py and Stability-AI/generative-models.

ResNet blocks with the timestep embedding, spatial transformers (self-attention, cross-attention to the
condition tokens, GEGLU feed-forward), a down path whose activations are concatenated into the up path,
and a middle block. Class-conditional use (LDM-4 ImageNet): the class is one cross-attention token (a label
embedding, null class for guidance). Text: caption tokens by cross-attention. SDXL micro-conditioning:
sinusoidal features of six control values (original size, crop top-left, target size) and the pooled text
vector, embedded and added to the timestep embedding. Module names follow diffusers' UNet2DConditionModel
(descriptive, and its checkpoints load as they are). Shapes: B batch, C channels, H x W latent grid.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..conditioning.cond import Cond
from .control import ControlEmbedder, zero_init_control
from .frontend import plus, semantic_inputs, zero_dropped
from .layers import LabelEmbedder, timestep_embedding

# The six SDXL micro-conditions, in SDXL's order (each (h, w) or (top, left)).
MICRO_CONDITIONS = ("original_size", "crop_top_left", "target_size")


class TimestepEmbedding(nn.Module):
    """Sinusoidal features (already computed) -> Linear-SiLU-Linear."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv, + timestep embedding, GroupNorm-SiLU-dropout-conv, + skip (1x1 conv when the
    width changes)."""

    def __init__(self, in_channels: int, out_channels: int, temb_dim: int, groups: int = 32, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-5)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        # x [B, Cin, H, W], temb [B, Dt] -> [B, Cout, H, W]
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class UNetAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections (no bias) and an output projection; keys and
    values from `context` when given (cross-attention), else from x."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        B, T, D = x.shape
        context = x if context is None else context
        H = self.num_heads
        q = self.to_q(x).reshape(B, T, H, D // H).transpose(1, 2)
        k = self.to_k(context).reshape(B, -1, H, D // H).transpose(1, 2)
        v = self.to_v(context).reshape(B, -1, H, D // H).transpose(1, 2)
        attn_mask = None
        if mask is not None:
            mask = mask.bool() | ~mask.bool().any(dim=1, keepdim=True)  # a row without tokens attends to all
            attn_mask = mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out[0](out.transpose(1, 2).reshape(B, T, D))


class GEGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and GEGLU feed-forward, each with a residual."""

    def __init__(self, dim: int, num_heads: int, context_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = UNetAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = UNetAttention(dim, num_heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, projection in (1x1 conv, or linear on tokens as SDXL), transformer blocks, projection
    out, residual."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        context_dim: int,
        depth: int = 1,
        groups: int = 32,
        linear_projection: bool = False,
    ):
        super().__init__()
        self.linear_projection = linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if linear_projection else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, num_heads, context_dim) for _ in range(depth)]
        )
        self.proj_out = nn.Linear(channels, channels) if linear_projection else nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if self.linear_projection:
            h = self.proj_in(h.permute(0, 2, 3, 1).reshape(B, H * W, C))
        else:
            h = self.proj_in(h).permute(0, 2, 3, 1).reshape(B, H * W, C)
        for block in self.transformer_blocks:
            h = block(h, context, mask)  # [B, H*W, C]
        if self.linear_projection:
            h = self.proj_out(h).reshape(B, H, W, C).permute(0, 3, 1, 2)
        else:
            h = self.proj_out(h.reshape(B, H, W, C).permute(0, 3, 1, 2))
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """num_layers ResNet blocks (each followed by a spatial transformer when depth > 0), then a 2x
    downsampling unless it is the last level. Returns every intermediate activation for the skips."""

    def __init__(
        self,
        in_channels,
        out_channels,
        temb_dim,
        num_layers,
        heads,
        context_dim,
        depth,
        groups,
        linear_projection,
        downsample,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock(in_channels if i == 0 else out_channels, out_channels, temb_dim, groups)
                for i in range(num_layers)
            ]
        )
        if depth:
            self.attentions = nn.ModuleList(
                [
                    SpatialTransformer(out_channels, heads, context_dim, depth, groups, linear_projection)
                    for _ in range(num_layers)
                ]
            )
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if downsample else None

    def forward(self, x, temb, context, mask):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if hasattr(self, "attentions"):
                x = self.attentions[i](x, context, mask)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """num_layers ResNet blocks, each on [x; a skip] (and a spatial transformer when depth > 0), then a 2x
    upsampling unless it is the last level."""

    def __init__(
        self,
        in_channels,
        out_channels,
        prev_channels,
        temb_dim,
        num_layers,
        heads,
        context_dim,
        depth,
        groups,
        linear_projection,
        upsample,
    ):
        super().__init__()
        self.resnets = nn.ModuleList(
            [
                ResnetBlock(
                    (prev_channels if i == 0 else out_channels)
                    + (in_channels if i == num_layers - 1 else out_channels),
                    out_channels,
                    temb_dim,
                    groups,
                )
                for i in range(num_layers)
            ]
        )
        if depth:
            self.attentions = nn.ModuleList(
                [
                    SpatialTransformer(out_channels, heads, context_dim, depth, groups, linear_projection)
                    for _ in range(num_layers)
                ]
            )
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x, skips, temb, context, mask):
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if hasattr(self, "attentions"):
                x = self.attentions[i](x, context, mask)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels, temb_dim, heads, context_dim, depth, groups, linear_projection):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, temb_dim, groups) for _ in range(2)])
        self.attentions = nn.ModuleList(
            [SpatialTransformer(channels, heads, context_dim, depth, groups, linear_projection)]
        )

    def forward(self, x, temb, context, mask):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context, mask)
        return self.resnets[1](x, temb)


class UNet(nn.Module):
    """The LDM/SDXL UNet. block_out_channels per level; transformer_depth per level (0 = no attention at that
    level, as LDM's first level and SDXL's); heads per level from head_channels; the middle block uses the
    last level's depth (at least 1). conditioning "class" (one class token of width context_dim) or "text"
    (cond.context [B, L, context_dim], cond.context_mask). micro_conditions (SDXL): the six values of
    MICRO_CONDITIONS from cond.control and cond.pooled [B, pooled_dim] are embedded and added to the time
    embedding; dropped samples (cond.drop_semantic) get a zero context and pooled vector, as SDXL's empty prompt.
    semantic_path "adaln" (class only, the additive mechanism) adds a class embedding to the time embedding
    instead of the class token (ADM's form); the transformers' second attention then attends to the image
    itself, as diffusers' does without a context. control (ControlEmbedder arguments) adds the embedded
    control values, weighted by w(t), to the time embedding."""

    def __init__(
        self,
        input_size: int = 32,
        in_channels: int = 4,
        learn_sigma: bool = False,
        block_out_channels: tuple[int, ...] = (192, 384, 576, 960),
        layers_per_block: int = 2,
        transformer_depth: tuple[int, ...] = (0, 1, 1, 1),
        head_channels: int | None = None,
        num_heads: int | None = 1,
        context_dim: int = 512,
        norm_groups: int = 32,
        linear_projection: bool = False,
        conditioning: str = "class",
        num_classes: int = 1000,
        micro_conditions: bool = False,
        pooled_dim: int = 1280,
        micro_embed_dim: int = 256,
        semantic_path: str = "attention",
        control: dict | None = None,
    ):
        super().__init__()
        if conditioning not in ("class", "text"):
            raise ValueError(f"UNet conditioning must be class or text, got {conditioning!r}")
        if semantic_path not in ("attention", "adaln") or (semantic_path == "adaln" and conditioning != "class"):
            raise ValueError(
                f"the UNet takes text by attention and class by attention or adaln, not {conditioning} via "
                f"{semantic_path}"
            )
        self.semantic_path = semantic_path
        if len(transformer_depth) != len(block_out_channels):
            raise ValueError("transformer_depth needs one entry per level of block_out_channels")
        if input_size % 2 ** (len(block_out_channels) - 1):
            raise ValueError(
                f"input size {input_size} is not divisible by the UNet's {2 ** (len(block_out_channels) - 1)}x "
                "downsampling"
            )
        self.input_size, self.in_channels = input_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.block_out_channels, self.conditioning, self.micro_conditions = (
            tuple(block_out_channels),
            conditioning,
            micro_conditions,
        )
        self.micro_embed_dim, self.model_channels = micro_embed_dim, block_out_channels[0]
        temb_dim = 4 * block_out_channels[0]
        # Heads: a fixed number per transformer (LDM: num_heads 1), or channels / head_channels (SDXL: 64).
        heads = [c // head_channels if head_channels else num_heads for c in block_out_channels]

        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], temb_dim)
        if micro_conditions:
            self.add_embedding = TimestepEmbedding(6 * micro_embed_dim + pooled_dim, temb_dim)
        if conditioning == "class" and semantic_path == "adaln":
            self.class_embedding = LabelEmbedder(num_classes, temb_dim)
            context_dim = None  # the second attention of each transformer attends to the image
        elif conditioning == "class":
            self.class_embedder = LabelEmbedder(num_classes, context_dim)
        self.control_embedder = ControlEmbedder(temb_dim, **control) if control else None
        levels = len(block_out_channels)
        self.down_blocks = nn.ModuleList()
        channels = block_out_channels[0]
        for i, out in enumerate(block_out_channels):
            self.down_blocks.append(
                DownBlock(
                    channels,
                    out,
                    temb_dim,
                    layers_per_block,
                    heads[i],
                    context_dim,
                    transformer_depth[i],
                    norm_groups,
                    linear_projection,
                    downsample=i < levels - 1,
                )
            )
            channels = out
        self.mid_block = MidBlock(
            block_out_channels[-1],
            temb_dim,
            heads[-1],
            context_dim,
            max(transformer_depth[-1], 1),
            norm_groups,
            linear_projection,
        )
        self.up_blocks = nn.ModuleList()
        reversed_channels = list(reversed(block_out_channels))
        prev = reversed_channels[0]
        for i, out in enumerate(reversed_channels):
            skip_in = reversed_channels[min(i + 1, levels - 1)]
            level = levels - 1 - i
            self.up_blocks.append(
                UpBlock(
                    skip_in,
                    out,
                    prev,
                    temb_dim,
                    layers_per_block + 1,
                    heads[level],
                    context_dim,
                    transformer_depth[level],
                    norm_groups,
                    linear_projection,
                    upsample=i < levels - 1,
                )
            )
            prev = out
        self.conv_norm_out = nn.GroupNorm(norm_groups, block_out_channels[0], eps=1e-5)
        self.conv_out = nn.Conv2d(block_out_channels[0], self.out_channels, 3, padding=1)
        self.initialize_weights()

    def initialize_weights(self):
        # PyTorch's default init everywhere (as LDM), except: the residual branch of every ResNet block,
        # every transformer's output projection and the output convolution start at zero (LDM's zero_module).
        if self.conditioning == "class":
            table = self.class_embedding if self.semantic_path == "adaln" else self.class_embedder
            nn.init.normal_(table.embedding_table.weight, std=0.02)
        zero_init_control(self.control_embedder)
        for module in self.modules():
            if isinstance(module, ResnetBlock):
                nn.init.zeros_(module.conv2.weight)
                nn.init.zeros_(module.conv2.bias)
            elif isinstance(module, SpatialTransformer):
                nn.init.zeros_(module.proj_out.weight)
                nn.init.zeros_(module.proj_out.bias)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        # x [B, C, H, W] latents, t [B] noise level in [0, 1] (the embedder sees 1000 * t, as DDPM steps)
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet expects input [B, {self.in_channels}, H, W], got {list(x.shape)}")
        factor = 2 ** (len(self.block_out_channels) - 1)
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"UNet input height and width must be multiples of {factor}, got {list(x.shape[2:])}")
        temb = self.time_embedding(timestep_embedding(t * 1000.0, self.model_channels).to(x.dtype))  # [B, 4C]
        if self.conditioning == "text":
            embedder = None  # caption tokens are attended as they come
        else:
            embedder = self.class_embedding if self.semantic_path == "adaln" else self.class_embedder
        y, context, mask = semantic_inputs(cond, self.conditioning, self.semantic_path, embedder, name="UNet")
        temb = plus(plus(temb, y), self.micro_embedding(cond, x.shape[0]))  # y [B, 4C]: a class in the adaln path
        if self.control_embedder is not None:
            temb = temb + self.control_embedder(cond.control, t, cond.drop_control).to(temb.dtype)
        h = self.conv_in(x)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, temb, context, mask)
            skips += block_skips
        h = self.mid_block(h, temb, context, mask)
        for block in self.up_blocks:
            h = block(h, skips, temb, context, mask)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # [B, C_out, H, W]

    def micro_embedding(self, cond: Cond, B: int) -> torch.Tensor | None:
        """SDXL's added embedding [B, 4C] of the pooled caption and the size/crop micro-conditions, or None."""
        if not self.micro_conditions:
            return None
        missing = [k for k in MICRO_CONDITIONS if k not in cond.control]
        if missing or cond.pooled is None:
            raise ValueError(
                f"this UNet takes SDXL micro-conditions: cond.control needs {', '.join(MICRO_CONDITIONS)} and "
                "cond.pooled"
            )
        values = torch.cat([cond.control[k].reshape(B, 2) for k in MICRO_CONDITIONS], dim=1)  # [B, 6]
        micro = timestep_embedding(values.flatten(), self.micro_embed_dim).reshape(B, -1)  # [B, 6 * 256]
        pooled = zero_dropped(cond.pooled, cond.drop_semantic)
        return self.add_embedding(torch.cat([pooled, micro.to(pooled.dtype)], dim=1))


# LDM-4 ImageNet (latent-diffusion configs/latent-diffusion/cin256-v2.yaml: 192 channels x (1, 2, 3, 5), 2 blocks
# per level, single-head attention at the three lower resolutions, a 512-d class token); SDXL's UNet
# (320 x (1, 2, 4), transformer depths 0/2/10, 64-channel heads, linear projections, 2048-d context, micro-
# conditioning with a 1280-d pooled vector); small sizes for tests and CPU runs.
UNET_PRESETS = {
    "UNet-tiny": dict(
        block_out_channels=(16, 32),
        layers_per_block=1,
        transformer_depth=(0, 1),
        head_channels=8,
        context_dim=32,
        norm_groups=4,
    ),
    "UNet-S": dict(
        block_out_channels=(64, 128, 256),
        layers_per_block=2,
        transformer_depth=(0, 1, 1),
        head_channels=32,
        context_dim=256,
    ),
    "UNet/LDM": dict(
        block_out_channels=(192, 384, 576, 960),
        layers_per_block=2,
        transformer_depth=(0, 1, 1, 1),
        num_heads=1,
        context_dim=512,
    ),
    "UNet/SDXL": dict(
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_depth=(0, 2, 10),
        head_channels=64,
        context_dim=2048,
        linear_projection=True,
    ),
}
