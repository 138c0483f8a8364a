"""MDT-v2, the Masked Diffusion Transformer (Gao et al., 2023), after sail-sg/MDT's masked_diffusion/models.py.

DiT-style adaLN-Zero blocks with a relative position bias in every attention, arranged as an encoder with
long skips (the second half of the encoder and every decoder block fuse a skip by a linear layer) and a
decoder whose blocks all take the embedded input as their skip. Learnable positional tables (initialised to
sin-cos) before the encoder and before the decoder. Masked latent modelling: a training pass may keep only
some tokens (`keep`, drawn by the training loop); the encoder runs on those, and a side-interpolator block
fills the masked positions from mask tokens before the decoder. Module names follow the official
checkpoints, so their state dicts load as they are. Shapes: B batch, C channels, T tokens, K kept, D width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..conditioning.cond import Cond
from .control import ControlEmbedder, zero_init_control
from .frontend import plus_control, semantic_inputs
from .layers import (
    FinalLayer,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    PooledTextEmbedder,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
    modulate,
    unpatchify,
    xavier_init_linears,
)


class RelativePositionBias(nn.Module):
    """BEiT's learned bias per (relative offset, head) on a square grid: [H, T, T]. The table has 3 extra
    rows (BEiT's class-token entries), unused here but part of the checkpoint layout."""

    def __init__(self, grid: int, num_heads: int):
        super().__init__()
        self.grid = grid
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * grid - 1) ** 2 + 3, num_heads))
        coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")).flatten(1)  # [2, T]
        relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (grid - 1)  # [T, T, 2], offsets >= 0
        self.register_buffer("relative_position_index", relative[..., 0] * (2 * grid - 1) + relative[..., 1])

    def forward(self) -> torch.Tensor:
        T = self.grid**2
        return self.relative_position_bias_table[self.relative_position_index.view(-1)].view(T, T, -1).permute(2, 0, 1)


class Attention(nn.Module):
    """Self-attention with a relative position bias; with `keep` [B, K] only those tokens' bias entries."""

    def __init__(self, dim: int, num_heads: int, grid: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_bias = RelativePositionBias(grid, num_heads)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        bias = self.rel_pos_bias()[None]  # [1, H, T, T]
        if keep is not None:
            H = bias.shape[1]
            rows = keep[:, None, :, None].expand(B, H, N, bias.shape[-1])
            bias = torch.gather(bias.expand(B, -1, -1, -1), 2, rows)  # [B, H, K, T]
            bias = torch.gather(bias, 3, keep[:, None, None, :].expand(B, H, N, N))  # [B, H, K, K]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class MDTBlock(nn.Module):
    """DiT's adaLN-Zero block with the biased attention; with skip, [x; skip] is first fused by a linear layer."""

    def __init__(self, dim: int, num_heads: int, grid: int, mlp_ratio: float = 4.0, skip: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, grid)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x, c, skip=None, keep=None):
        # x [B, N, D], c [B, D], skip [B, N, D]
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), keep)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class MDT(nn.Module):
    """MDT-v2: class-conditional as published; "pooled_text" is the additive text variant (as DiT's).
    forward(x, t, cond, keep=None): keep [B, K] are the indices of the tokens the masked training pass keeps
    (None: the full pass, used for sampling). mask_ratio is the lower end of the share of tokens masked per
    masked pass (MDT-v2: U[mask_ratio, mask_ratio + 0.2])."""

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
        conditioning: str = "class",
        num_classes: int = 1000,
        pooled_dim: int = 384,
        decode_layers: int = 4,
        mask_ratio: float | None = 0.3,
        control: dict | None = None,
    ):
        super().__init__()
        if conditioning not in ("class", "pooled_text"):
            raise ValueError(f"MDT conditioning must be class or pooled_text (adaLN, as DiT), got {conditioning!r}")
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by patch size {patch_size}")
        if depth <= decode_layers or (depth - decode_layers) % 2:
            raise ValueError(f"MDT depth {depth} minus {decode_layers} decoder blocks must be a positive even number")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size, self.num_heads, self.mask_ratio, self.conditioning = (
            hidden_size,
            num_heads,
            mask_ratio,
            conditioning,
        )
        self.grid = input_size // patch_size
        num_patches = self.grid**2
        half_depth = (depth - decode_layers) // 2

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if conditioning == "class":
            self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        else:  # the additive text baseline, as ldmkit's DiT
            self.text_embedder = PooledTextEmbedder(pooled_dim, hidden_size)
        self.control_embedder = ControlEmbedder(hidden_size, **control) if control else None  # additive only
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size))  # learnable, sin-cos at init
        self.en_inblocks = nn.ModuleList(
            [MDTBlock(hidden_size, num_heads, self.grid, mlp_ratio) for _ in range(half_depth)]
        )
        self.en_outblocks = nn.ModuleList(
            [MDTBlock(hidden_size, num_heads, self.grid, mlp_ratio, skip=True) for _ in range(half_depth)]
        )
        self.de_blocks = nn.ModuleList(
            [MDTBlock(hidden_size, num_heads, self.grid, mlp_ratio, skip=True) for _ in range(decode_layers)]
        )
        self.sideblocks = nn.ModuleList([MDTBlock(hidden_size, num_heads, self.grid, mlp_ratio)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size), requires_grad=mask_ratio is not None)
        self.initialize_weights()

    def initialize_weights(self):
        xavier_init_linears(self)
        table = torch.from_numpy(get_2d_sincos_pos_embed(self.hidden_size, self.grid)).float().unsqueeze(0)
        self.pos_embed.data.copy_(table)
        self.decoder_pos_embed.data.copy_(table)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.conditioning == "class":
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zero_init_control(self.control_embedder)
        for block in [*self.en_inblocks, *self.en_outblocks, *self.de_blocks, *self.sideblocks]:
            nn.init.trunc_normal_(block.attn.rel_pos_bias.relative_position_bias_table, std=0.02)
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.mask_ratio is not None:
            nn.init.normal_(self.mask_token, std=0.02)

    def side_interpolate(self, x: torch.Tensor, c: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        # x [B, K, D] encoder output of the kept tokens -> [B, T, D]: mask tokens elsewhere, the side block's
        # prediction at the masked positions, the encoder output at the kept ones.
        B, K, D = x.shape
        full = self.mask_token.to(x.dtype).expand(B, self.grid**2, D).clone()
        full = full.scatter(1, keep[..., None].expand(B, K, D), x) + self.decoder_pos_embed
        masked = torch.ones(B, self.grid**2, 1, device=x.device, dtype=x.dtype).scatter(1, keep[..., None], 0.0)
        side = full
        for block in self.sideblocks:
            side = block(side, c)
        return side * masked + full * (1 - masked)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, keep: torch.Tensor | None = None) -> torch.Tensor:
        # x [B, C, H, W] latents, t [B] noise level in [0, 1], cond: class labels or pooled caption, keep [B, K] or None
        if x.shape[1:] != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(
                f"MDT expects input [B, {self.in_channels}, {self.input_size}, {self.input_size}], got {list(x.shape)}"
            )
        x = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # [B, T, D]
        embedder = self.y_embedder if self.conditioning == "class" else self.text_embedder
        y, _, _ = semantic_inputs(cond, self.conditioning, "adaln", embedder, name="MDT")  # [B, D]
        c = plus_control(self.t_embedder(t) + y, self.control_embedder, cond, t)  # [B, D]
        input_skip = x
        if keep is not None:
            x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))  # [B, K, D]
        skips = []
        for block in self.en_inblocks:
            x = block(x, c, keep=keep)
            skips.append(x)
        for block in self.en_outblocks:
            x = block(x, c, skip=skips.pop(), keep=keep)
        x = self.side_interpolate(x, c, keep) if keep is not None else x + self.decoder_pos_embed.to(x.dtype)
        for block in self.de_blocks:
            x = block(x, c, skip=input_skip)
        x = self.final_layer(x, c)  # [B, T, p*p*C_out]
        return unpatchify(x, self.grid, self.grid, self.patch_size, self.out_channels)  # [B, C_out, H, W]


def draw_token_keep(batch: int, tokens: int, mask_ratio: float, generator: torch.Generator, device) -> torch.Tensor:
    """MDT-v2's masking for one training step: a share of masked tokens drawn from U[r, r + 0.2] for the
    step, and per sample a random set of tokens to keep: indices [batch, K]."""
    ratio = mask_ratio + 0.2 * torch.rand(1, generator=generator, device=device).item()
    noise = torch.rand(batch, tokens, generator=generator, device=device)
    return torch.argsort(noise, dim=1)[:, : int(tokens * (1 - ratio))]


# MDT-v2's sizes (DiT's depth/width/heads; 4 decoder blocks), and small ones for tests and CPU runs.
MDT_SIZES = {
    "tiny": dict(depth=6, hidden_size=64, num_heads=2, decode_layers=2),
    "S": dict(depth=12, hidden_size=384, num_heads=6, decode_layers=4),
    "B": dict(depth=12, hidden_size=768, num_heads=12, decode_layers=4),
    "L": dict(depth=24, hidden_size=1024, num_heads=16, decode_layers=4),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16, decode_layers=4),
}
MDT_PRESETS = {f"mDT-v2-{size}/{p}": dict(arch, patch_size=p) for size, arch in MDT_SIZES.items() for p in (2, 4)}
