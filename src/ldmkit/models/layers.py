"""Layers shared by every backbone: attention (SDPA), MLP, adaLN modulation, embedders, positional tables.

Plain PyTorch only: no precision, distribution or compile logic here (the trainer applies those from
outside). Shapes: B batch, T tokens, D width, H heads.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation of tokens x [B, T, D] by per-sample shift/scale [B, D]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, computed by scaled_dot_product_attention
    (flash / memory-efficient kernels on GPUs, picked by PyTorch)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x [B, H, T, D/H]
        x = F.scaled_dot_product_attention(q, k, v)  # [B, H, T, D/H]
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class CrossAttention(nn.Module):
    """Multi-head attention of tokens x [B, T, D] to a context [B, L, Dc] (already projected to D, or
    projected here when context_dim differs), with an optional key mask [B, L] (True = attend).
    Fused kv projection, as PixArt-alpha's MultiHeadCrossAttention."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv_linear = nn.Linear(context_dim or dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x.shape
        L, H = context.shape[1], self.num_heads
        q = self.q_linear(x).reshape(B, T, H, D // H).transpose(1, 2)  # [B, H, T, D/H]
        k, v = self.kv_linear(context).reshape(B, L, 2, H, D // H).permute(2, 0, 3, 1, 4)  # 2 x [B, H, L, D/H]
        attn_mask = None
        if mask is not None:
            # A row with no valid token attends to all (rather than producing NaN).
            mask = mask.bool() | ~mask.bool().any(dim=1, keepdim=True)
            attn_mask = mask[:, None, None, :]  # [B, 1, 1, L]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map of each token to its p*p*C_out patch values (DiT, MDT, mmDiT)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # [B, T, p*p*C_out]


def patch_grid(x: torch.Tensor, channels: int, patch_size: int, name: str) -> tuple[int, int]:
    """(h, w) tokens of latents x [B, channels, H, W], whose sides the patch must divide."""
    p = patch_size
    if x.ndim != 4 or x.shape[1] != channels or x.shape[2] % p or x.shape[3] % p:
        raise ValueError(
            f"{name} expects input [B, {channels}, H, W] with H and W multiples of {p}, got {list(x.shape)}"
        )
    return x.shape[2] // p, x.shape[3] // p


def unpatchify(x: torch.Tensor, h: int, w: int, patch_size: int, channels: int) -> torch.Tensor:
    """Tokens [B, h*w, p*p*C] -> image [B, C, h*p, w*p] (the inverse of PatchEmbed's layout)."""
    p = patch_size
    x = x.reshape(x.shape[0], h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, h * p, w * p)


def xavier_init_linears(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Linear below module (the transformers' base init)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU (as DiT and PixArt)."""

    def __init__(self, dim: int, hidden_dim: int, out_dim: int | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, out_dim or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):
    """Image [B, C, H, W] -> tokens [B, (H/p)*(W/p), D] by a strided convolution."""

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0) -> torch.Tensor:
    """Sinusoidal features [B, dim] of (possibly fractional) timesteps t [B], cos half first.

    freq_shift=0 is facebookresearch/DiT (and GLIDE/ADM); diffusers' DiT/PixArt use freq_shift=1
    (`downscale_freq_shift`), which divides the exponent by (half - 1) instead of half.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t[:, None].float() * torch.exp(exponent)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepEmbedder(nn.Module):
    """Noise level -> vector: sinusoidal features of `time_scale * t`, then a 2-layer SiLU MLP.

    The backbone contract gives t in [0, 1]; DiT was trained on integer DDPM steps 0..999, so
    time_scale=1000 feeds the embedder exactly what the official checkpoints expect.
    """

    def __init__(self, dim: int, frequency_dim: int = 256, time_scale: float = 1000.0, freq_shift: float = 0.0):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.time_scale = time_scale
        self.freq_shift = freq_shift
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(t * self.time_scale, self.frequency_dim, freq_shift=self.freq_shift)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class ids [B] -> vectors [B, D]; row `num_classes` is the learned null class used for
    classifier-free guidance. Which samples are dropped is decided by the conditioner (cond.drop_semantic),
    so guidance dropout is seeded and reproducible rather than drawn inside the model."""

    takes_drop = True  # its own null condition (see models/frontend.py)

    def __init__(self, num_classes: int, dim: int, use_null_class: bool = True):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + int(use_null_class), dim)

    def forward(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        # Checked on the CPU only: on a GPU reading the range back would stall every step (the data and sampling
        # paths check labels before they reach the device), and meta tensors hold no values.
        if labels.device.type == "cpu" and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"class id out of range [0, {self.num_classes}): {labels.min().item()}..{labels.max().item()}"
            )
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class PooledTextEmbedder(nn.Module):
    """Pooled caption vector [B, Dp] -> [B, D] (Linear-SiLU-Linear, as SDXL's add_embedding), summed into the
    adaLN vector like a class embedding. Dropped rows (cond.drop_semantic) use a learned null vector."""

    takes_drop = True

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.in_dim = in_dim
        self.null = nn.Parameter(torch.zeros(in_dim))
        self.mlp = nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, pooled: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        if pooled.ndim != 2 or pooled.shape[1] != self.in_dim:
            raise ValueError(f"pooled text vector must be [B, {self.in_dim}], got {list(pooled.shape)}")
        if drop is not None:
            pooled = torch.where(drop[:, None], self.null.to(pooled.dtype).expand_as(pooled), pooled)
        return self.mlp(pooled)


# ---------------------------------------------------------------- fixed 2D sin-cos positional tables
def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[M] positions -> [M, dim] (sin half, then cos half), float64 as in MAE/DiT."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_h: np.ndarray, grid_w: np.ndarray) -> np.ndarray:
    """Table [len(grid_h)*len(grid_w), dim] for the given (possibly fractional) row/column positions.
    First half of the channels encodes the column (w), second half the row (h), as MAE/DiT order them."""
    w, h = np.meshgrid(grid_w, grid_h)  # each [Gh, Gw]; token order is row-major
    return np.concatenate([sincos_1d(dim // 2, w), sincos_1d(dim // 2, h)], axis=1)


def get_2d_sincos_pos_embed(dim: int, grid_size: int | tuple[int, int]) -> np.ndarray:
    """DiT's table for a grid of integer positions (square side, or (rows, cols)): [rows * cols, dim]."""
    rows, cols = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    return sincos_2d(dim, np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64))


# Positions of a grid measured on another one (resolution transfer: ldmkit.transfer.resample explains the modes).
RESAMPLE_MODES = ("extrapolate", "interpolate", "rectified")


def grid_positions(new: int, old: int, mode: str) -> np.ndarray:
    """Positions [new] of the new grid's cells in units of the old grid's cells (cell i of the old grid at i)."""
    if mode not in RESAMPLE_MODES:
        raise ValueError(f"unknown positional-embedding resampling {mode!r} (one of {', '.join(RESAMPLE_MODES)})")
    i = np.arange(new, dtype=np.float64)
    if mode == "extrapolate":
        return i
    if mode == "interpolate":
        return i * old / new
    return (i + 0.5) * old / new - 0.5


def sincos_table(dim: int, new: tuple[int, int], old: tuple[int, int], mode: str) -> torch.Tensor:
    """A fixed sin-cos table [1, new_h * new_w, dim] for a new grid, its positions measured on the old one."""
    rows, cols = grid_positions(new[0], old[0], mode), grid_positions(new[1], old[1], mode)
    return torch.from_numpy(sincos_2d(dim, rows, cols)).float().unsqueeze(0)
