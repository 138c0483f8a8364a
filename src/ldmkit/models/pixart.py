"""PixArt-alpha (Chen et al., 2023), after PixArt-alpha/PixArt-alpha's PixArt.py / PixArtMS.py.

adaLN-single: one timestep MLP shared by all blocks (t_block -> 6 x D), plus a learned per-block table
(scale_shift_table) added to it; cross-attention to the caption tokens after self-attention (not
modulated); caption projection with a fixed null caption for guidance dropout. The multi-scale variant
(micro_conditions) adds embeddings of the image resolution and aspect ratio to the timestep embedding.
Class-conditional use (ImageNet): the class is one attended token (a label embedding with a null class),
on the same cross-attention path the caption uses. Module names follow the official checkpoints.
Shapes: B batch, C latent channels, T tokens, D width, L caption tokens, Dc caption width.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from ..conditioning.cond import Cond
from .control import ControlEmbedder, zero_init_control
from .frontend import plus, plus_control, semantic_inputs
from .layers import (
    Attention,
    CrossAttention,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    grid_positions,
    patch_grid,
    sincos_2d,
    unpatchify,
    xavier_init_linears,
)


def t2i_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x [B, T, D], shift/scale [B, 1, D]
    return x * (1 + scale) + shift


class CaptionEmbedder(nn.Module):
    """Caption tokens [B, L, Dc] -> [B, L, D] (Linear-GELU-Linear). Dropped rows take the null caption
    `y_embedding`, a fixed random table (a buffer, as in PixArt-alpha)."""

    takes_drop = True

    def __init__(self, in_channels: int, dim: int, max_tokens: int = 120):
        super().__init__()
        self.y_proj = Mlp(in_channels, dim, dim)
        self.register_buffer("y_embedding", torch.randn(max_tokens, in_channels) / in_channels**0.5)

    def forward(self, caption: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        if drop is not None:
            L = caption.shape[1]
            if L > self.y_embedding.shape[0]:
                raise ValueError(f"caption has {L} tokens, the null caption {self.y_embedding.shape[0]}")
            caption = torch.where(drop[:, None, None], self.y_embedding[:L].to(caption.dtype), caption)
        return self.y_proj(caption)


class PixArtBlock(nn.Module):
    """Self-attention and MLP modulated by the shared timestep vector + this block's table; cross-attention
    to the condition tokens in between (absent when the class is summed into the timestep vector)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, cross_attention: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        if cross_attention:
            self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        # x [B, T, D], t [B, 6*D] (shared), context [B, L, D], mask [B, L]
        B = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t.reshape(B, 6, -1)
        ).chunk(6, dim=1)
        x = x + gate_msa * self.attn(t2i_modulate(self.norm1(x), shift_msa, scale_msa))
        if context is not None:
            x = x + self.cross_attn(x, context, mask)
        x = x + gate_mlp * self.mlp(t2i_modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class T2IFinalLayer(nn.Module):
    """LayerNorm modulated by the timestep embedding + a learned table, then tokens -> patches."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # x [B, T, D], t [B, D] (the timestep embedding before t_block)
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        return self.linear(t2i_modulate(self.norm_final(x), shift, scale))  # [B, T, p*p*C_out]


class PixArt(nn.Module):
    """PixArt-alpha. conditioning "text" (caption tokens in cond.context, mask in cond.context_mask) or
    "class" (cond.class_labels as one token). With micro_conditions (PixArt-alpha MS), the resolution
    (cond.control["original_size"], h and w) and aspect ratio (h / w of cond.control["target_size"]) are
    embedded and added to the timestep embedding. semantic_path "adaln" (class only, the additive
    mechanism) sums the class embedding into the timestep embedding instead and drops the cross-attention;
    control (ControlEmbedder arguments) adds the embedded control values, weighted by w(t), to it."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        learn_sigma: bool = True,
        conditioning: str = "text",
        caption_channels: int = 4096,
        max_tokens: int = 120,
        num_classes: int = 1000,
        micro_conditions: bool = False,
        pe_interpolation: float | None = None,
        semantic_path: str = "attention",
        control: dict | None = None,
        pos_embed_base_size: int | None = None,
        pos_embed_resample: str = "extrapolate",
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by patch size {patch_size}")
        if conditioning not in ("text", "class"):
            raise ValueError(f"PixArt conditioning must be text or class, got {conditioning!r}")
        if semantic_path not in ("attention", "adaln") or (semantic_path == "adaln" and conditioning != "class"):
            raise ValueError(
                f"PixArt takes text by attention and class by attention or adaln, not {conditioning} via "
                f"{semantic_path}"
            )
        self.semantic_path = semantic_path
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size, self.num_heads, self.conditioning = hidden_size, num_heads, conditioning
        self.micro_conditions = micro_conditions
        # Positions are scaled so that the base grid spans base_size / pe_interpolation (PixArt's "lewei_scale":
        # 1 at 256 and 512 pixels, 2 at 1024, as diffusers' max(sample_size // 64, 1)).
        self.base_size = input_size // patch_size
        # A model fine-tuned from another input size may measure its positions on that grid instead (transfer.resample).
        self.pos_base_grid = pos_embed_base_size // patch_size if pos_embed_base_size else None
        self.pos_embed_resample = pos_embed_resample
        self.pe_interpolation = pe_interpolation if pe_interpolation is not None else max(input_size // 64, 1)

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        if conditioning == "text":
            self.y_embedder = CaptionEmbedder(caption_channels, hidden_size, max_tokens)
        else:
            self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.control_embedder = ControlEmbedder(hidden_size, **control) if control else None
        if micro_conditions:
            self.csize_embedder = TimestepEmbedder(hidden_size // 3, time_scale=1.0)  # each of h, w
            self.ar_embedder = TimestepEmbedder(hidden_size // 3, time_scale=1.0)
        self.register_buffer("pos_embed", torch.zeros(1, self.base_size**2, hidden_size))
        self.blocks = nn.ModuleList(
            [PixArtBlock(hidden_size, num_heads, mlp_ratio, semantic_path == "attention") for _ in range(depth)]
        )
        self.final_layer = T2IFinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        xavier_init_linears(self)
        self.pos_embed.data.copy_(self.pos_table(self.base_size, self.base_size))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.t_block[1].weight, std=0.02)
        if self.conditioning == "text":
            nn.init.normal_(self.y_embedder.y_proj.fc1.weight, std=0.02)
            nn.init.normal_(self.y_embedder.y_proj.fc2.weight, std=0.02)
        else:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        # Cross-attention outputs and the final layer start at zero.
        for block in self.blocks:
            if hasattr(block, "cross_attn"):
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        zero_init_control(self.control_embedder)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def pos_table(self, h: int, w: int) -> torch.Tensor:
        # [1, h*w, D]: sin-cos of positions i * (base / h) / pe_interpolation, so any grid spans the base extent.
        if self.pos_base_grid is not None:
            scale = self.pos_base_grid / self.base_size
            rows = grid_positions(h, h * scale, self.pos_embed_resample) / self.pe_interpolation
            cols = grid_positions(w, w * scale, self.pos_embed_resample) / self.pe_interpolation
            return torch.from_numpy(sincos_2d(self.hidden_size, rows, cols)).float().unsqueeze(0)
        rows = np.arange(h, dtype=np.float64) / (h / self.base_size) / self.pe_interpolation
        cols = np.arange(w, dtype=np.float64) / (w / self.base_size) / self.pe_interpolation
        return torch.from_numpy(sincos_2d(self.hidden_size, rows, cols)).float().unsqueeze(0)

    def pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        if (h, w) == (self.base_size, self.base_size):
            return self.pos_embed
        return self.pos_table(h, w).to(self.pos_embed.device)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        # x [B, C, H, W] latents, t [B] noise level in [0, 1], cond: caption tokens (+ mask) or class labels
        h, w = patch_grid(x, self.in_channels, self.patch_size, "PixArt")
        x = self.x_embedder(x) + self.pos_embed_for(h, w).to(x.dtype)  # [B, T, D]
        c = plus(self.t_embedder(t), self.micro_embedding(cond, x.shape[0]))  # [B, D]
        c = plus_control(c, self.control_embedder, cond, t)
        y, context, mask = semantic_inputs(cond, self.conditioning, self.semantic_path, self.y_embedder, name="PixArt")
        c = plus(c, y)
        t0 = self.t_block(c)  # [B, 6D]: every block's modulation, shifted by its own table
        for block in self.blocks:
            x = block(x, t0, context, mask)  # context [B, L, D]
        x = self.final_layer(x, c)  # [B, T, p*p*C_out]
        return unpatchify(x, h, w, self.patch_size, self.out_channels)  # [B, C_out, H, W]

    def micro_embedding(self, cond: Cond, B: int) -> torch.Tensor | None:
        """PixArt-alpha MS: the embedded resolution and aspect ratio [B, D], or None without micro_conditions."""
        if not self.micro_conditions:
            return None
        if "original_size" not in cond.control or "target_size" not in cond.control:
            raise ValueError("PixArt with micro_conditions needs cond.control original_size and target_size")
        size = cond.control["original_size"].reshape(B, 2)
        target = cond.control["target_size"].reshape(B, 2)
        csize = self.csize_embedder(size.flatten()).reshape(B, -1)  # [B, 2D/3]
        ar = self.ar_embedder(target[:, 0] / target[:, 1])  # [B, D/3]
        return torch.cat([csize, ar], dim=1)


# PixArt-alpha's model (XL/2: DiT-XL's depth, width and heads) and small sizes for tests and CPU runs.
PIXART_SIZES = {
    "tiny": dict(depth=2, hidden_size=64, num_heads=2),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
PIXART_PRESETS = {
    f"PixArt-alpha-{size}/{p}": dict(arch, patch_size=p) for size, arch in PIXART_SIZES.items() for p in (2, 4)
}
