"""DiT: Scalable Diffusion Models with Transformers (Peebles & Xie, 2023), after facebookresearch/DiT.

Embedders, one adaLN-Zero block, model, explicit init, size presets (the final layer is shared: layers.py).
Module names follow the official checkpoint, so its state dicts load as they are (see models/dit_spec.py).
Shapes: B batch, C latent channels, T = (H/p)*(W/p) tokens, D width.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..conditioning.cond import Cond
from .control import ControlEmbedder, zero_init_control
from .frontend import plus, plus_control, semantic_inputs
from .layers import (
    Attention,
    CrossAttention,
    FinalLayer,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    PooledTextEmbedder,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
    modulate,
    patch_grid,
    sincos_table,
    unpatchify,
    xavier_init_linears,
)


class DiTBlock(nn.Module):
    """Transformer block whose LayerNorms are modulated by the conditioning vector c (adaLN-Zero); with
    cross_attention (the disentangled mechanism), a cross-attention to the semantic tokens follows the
    self-attention (zero-initialised output, so a new block starts as DiT's)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, cross_attention: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        if cross_attention:
            self.norm_cross = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        # x [B, T, D], c [B, D], context [B, L, D] (semantic tokens), mask [B, L]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if context is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, mask)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class DiT(nn.Module):
    """DiT. With learn_sigma the output has 2*C channels: the noise prediction, then the interpolation
    coefficient of the learned variance (Improved DDPM). conditioning="class" is the published model;
    "pooled_text" replaces the label embedding by an embedding of the pooled caption vector (the additive
    text baseline, as SDXL adds pooled text to the time embedding). Latents of another shape than
    input_size x input_size (aspect-ratio buckets) get a sin-cos table computed for their grid."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        timestep_freq_shift: float = 0.0,
        conditioning: str = "class",
        pooled_dim: int = 384,
        semantic_path: str = "adaln",
        context_dim: int = 4096,
        control: dict | None = None,
        pos_embed_base_size: int | None = None,
        pos_embed_resample: str = "extrapolate",
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by patch size {patch_size}")
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        # Positions are measured on the grid of pos_embed_base_size (a model fine-tuned from another resolution,
        # ldmkit.transfer.resample); by default on the model's own grid, as DiT.
        self.pos_base_grid = (pos_embed_base_size or input_size) // patch_size
        self.pos_embed_resample = pos_embed_resample

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=timestep_freq_shift)
        self.conditioning, self.semantic_path = conditioning, semantic_path
        if semantic_path not in ("adaln", "attention"):
            raise ValueError(f"DiT semantic_path must be adaln or attention, got {semantic_path!r}")
        if conditioning == "class":
            self.y_embedder = LabelEmbedder(num_classes, hidden_size)  # one vector in adaLN, or one attended token
        elif conditioning == "pooled_text" and semantic_path == "adaln":
            self.text_embedder = PooledTextEmbedder(pooled_dim, hidden_size)
        elif conditioning == "text" and semantic_path == "attention":
            self.context_embedder = nn.Linear(context_dim, hidden_size)  # caption tokens -> attended tokens
        else:
            raise ValueError(
                f"DiT takes class (adaln or attention), pooled_text (adaln) or text (attention), not {conditioning} "
                f"via {semantic_path}"
            )
        # Control metadata (crop, size, flip): per-key Fourier embeddings, grouped, weighted by w_group(t).
        self.control_embedder = ControlEmbedder(hidden_size, **control) if control else None
        num_patches = (input_size // patch_size) ** 2
        # Fixed sin-cos table, kept in the state dict as the official checkpoints do.
        self.register_buffer("pos_embed", torch.zeros(1, num_patches, hidden_size))
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio, semantic_path == "attention") for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        xavier_init_linears(self)
        grid = self.input_size // self.patch_size
        self.pos_embed.data.copy_(self.pos_table(grid, grid))
        # Patch embedding like a linear layer.
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.conditioning == "class":
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # Conditioning added by ldmkit starts silent: zero cross-attention outputs and control embeddings.
        for block in self.blocks:
            if hasattr(block, "cross_attn"):
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        zero_init_control(self.control_embedder)
        # adaLN-Zero: every block starts as the identity, the output as zero.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def pos_table(self, h: int, w: int) -> torch.Tensor:
        # [1, h*w, D] sin-cos at integer positions (DiT), or resampled from the base grid (transfer.resample)
        if self.pos_base_grid == self.input_size // self.patch_size:
            return torch.from_numpy(get_2d_sincos_pos_embed(self.hidden_size, (h, w))).float().unsqueeze(0)
        base = self.pos_base_grid
        return sincos_table(
            self.hidden_size, (h, w), (base * h / self.grid, base * w / self.grid), self.pos_embed_resample
        )

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size

    def pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        # [1, h*w, D]: the stored table for the training grid, a computed one for other grids (buckets).
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        return self.pos_table(h, w).to(self.pos_embed.device)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        # x [B, C, H, W] latents, t [B] noise level in [0, 1], cond: class labels, pooled caption or caption tokens
        h, w = patch_grid(x, self.in_channels, self.patch_size, "DiT")
        x = self.x_embedder(x) + self.pos_embed_for(h, w).to(x.dtype)  # [B, T, D]
        embedder = {"class": "y_embedder", "pooled_text": "text_embedder", "text": "context_embedder"}[
            self.conditioning
        ]
        y, context, mask = semantic_inputs(
            cond, self.conditioning, self.semantic_path, getattr(self, embedder), name="DiT"
        )
        c = plus_control(plus(self.t_embedder(t), y), self.control_embedder, cond, t)  # [B, D]
        for block in self.blocks:
            x = block(x, c, context, mask)  # context [B, L, D] when the condition is attended
        x = self.final_layer(x, c)  # [B, T, p*p*C_out]
        return unpatchify(x, h, w, self.patch_size, self.out_channels)  # [B, C_out, H, W]


# Sizes of the DiT paper (Table 1): depth, width, heads. Every size has patch 2, 4 and 8.
DIT_SIZES = {
    "tiny": dict(depth=2, hidden_size=64, num_heads=2),  # for tests
    "demo": dict(depth=6, hidden_size=256, num_heads=4),  # the CPU demo
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
DIT_PRESETS = {f"DiT-{size}/{p}": dict(arch, patch_size=p) for size, arch in DIT_SIZES.items() for p in (2, 4, 8)}
