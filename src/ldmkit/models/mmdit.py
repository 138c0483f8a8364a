"""mmDiT, the Stable Diffusion 3 backbone (Esser et al., 2024), after Stability-AI/sd3-ref's mmditx.py.

Two token streams, image and context, each with its own adaLN-Zero block weights (x_block, context_block),
meeting in one joint attention over the concatenated tokens. The adaLN vector is the timestep embedding
plus the embedding of the pooled text vector. The last context block is "pre-only": it feeds the attention
and is not updated. Optional RMS normalisation of queries and keys (SD3.5), and MMDiT-X's dual attention (SD3.5-medium:
in the listed blocks the image stream also attends to itself alone, with a second set of modulations). Positions: a
fixed sin-cos
table for a pos_embed_max_size grid, of which the centre crop of the input's grid is used.
Class-conditional use (ImageNet): the class is the context stream (one label-embedding token, null class
for guidance), with no pooled vector. Module names follow the official SD3 checkpoints.
Shapes: B batch, C latent channels, T image tokens, L context tokens, D width.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..conditioning.cond import Cond
from .control import ControlEmbedder, zero_init_control
from .frontend import plus, plus_control, semantic_inputs
from .layers import (
    FinalLayer,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    TimestepEmbedder,
    grid_positions,
    modulate,
    patch_grid,
    sincos_2d,
    unpatchify,
    xavier_init_linears,
)


class VectorEmbedder(nn.Module):
    """The pooled text vector -> the width (SD3's y_embedder: an MLP named mlp, as in the official weights)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.mlp(y)


def rename_legacy_keys(module, state_dict, prefix, *args) -> None:
    """Checkpoints written before the pooled embedder took its official name (y_embedder.0 -> y_embedder.mlp.0)."""
    for old in [k for k in state_dict if k.startswith(prefix + "y_embedder.") and k[len(prefix) + 11 :][:1].isdigit()]:
        state_dict[prefix + "y_embedder.mlp." + old[len(prefix) + 11 :]] = state_dict.pop(old)


class StreamAttention(nn.Module):
    """One stream's half of the joint attention: its qkv projection (with optional per-head RMS norm of q
    and k) and its output projection (absent for a pre-only stream)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, pre_only: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.ln_q = nn.RMSNorm(dim // num_heads, eps=1e-6) if qk_norm else nn.Identity()
        self.ln_k = nn.RMSNorm(dim // num_heads, eps=1e-6) if qk_norm else nn.Identity()
        if not pre_only:
            self.proj = nn.Linear(dim, dim)

    def pre_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, D = x.shape
        q, k, v = (
            self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        )  # 3 x [B, H, N, D/H]
        return self.ln_q(q), self.ln_k(k), v


class DismantledBlock(nn.Module):
    """adaLN-Zero transformer block whose attention is computed jointly with the other stream: pre_attention
    gives (q, k, v) and the residual state, post_attention applies the gated attention output and the MLP. A dual
    block (MMDiT-X) also attends over its own stream alone (attn2), modulated by three more adaLN chunks."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        pre_only: bool = False,
        dual: bool = False,
    ):
        super().__init__()
        self.pre_only, self.dual = pre_only, dual
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = StreamAttention(dim, num_heads, qk_norm, pre_only)
        if dual:
            self.attn2 = StreamAttention(dim, num_heads, qk_norm)
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (2 if pre_only else 9 if dual else 6) * dim))

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor):
        if self.pre_only:
            shift_msa, scale_msa = self.adaLN_modulation(c).chunk(2, dim=1)
            return self.attn.pre_attention(modulate(self.norm1(x), shift_msa, scale_msa)), None
        mods = self.adaLN_modulation(c).chunk(9 if self.dual else 6, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        x_norm = self.norm1(x)
        qkv = self.attn.pre_attention(modulate(x_norm, shift_msa, scale_msa))
        if not self.dual:
            return qkv, (x, gate_msa, shift_mlp, scale_mlp, gate_mlp, None, None)
        shift_msa2, scale_msa2, gate_msa2 = mods[6:]
        # the stream's own attention, done here: it needs nothing from the other stream
        q2, k2, v2 = self.attn2.pre_attention(modulate(x_norm, shift_msa2, scale_msa2))
        B, H, N, Dh = q2.shape
        attn2 = F.scaled_dot_product_attention(q2, k2, v2).transpose(1, 2).reshape(B, N, H * Dh)
        return qkv, (x, gate_msa, shift_mlp, scale_mlp, gate_mlp, attn2, gate_msa2)

    def post_attention(
        self, attn: torch.Tensor, x: torch.Tensor, gate_msa, shift_mlp, scale_mlp, gate_mlp, attn2, gate_msa2
    ) -> torch.Tensor:
        x = x + gate_msa.unsqueeze(1) * self.attn.proj(attn)
        if attn2 is not None:
            x = x + gate_msa2.unsqueeze(1) * self.attn2.proj(attn2)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """An image-stream block and a context-stream block sharing one attention over [image; context]."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        pre_only: bool = False,
        dual: bool = False,
    ):
        super().__init__()
        self.context_block = DismantledBlock(dim, num_heads, mlp_ratio, qk_norm, pre_only=pre_only)
        self.x_block = DismantledBlock(dim, num_heads, mlp_ratio, qk_norm, dual=dual)

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor):
        # context [B, L, D], x [B, T, D], c [B, D]
        (cq, ck, cv), context_state = self.context_block.pre_attention(context, c)
        (xq, xk, xv), x_state = self.x_block.pre_attention(x, c)
        q, k, v = (torch.cat([a, b], dim=2) for a, b in ((xq, cq), (xk, ck), (xv, cv)))  # [B, H, T+L, D/H]
        B, H, N, Dh = q.shape
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, H * Dh)  # [B, T+L, D]
        T = x.shape[1]
        x = self.x_block.post_attention(attn[:, :T], *x_state)
        context = (
            None if self.context_block.pre_only else self.context_block.post_attention(attn[:, T:], *context_state)
        )
        return context, x


class MMDiT(nn.Module):
    """mmDiT. conditioning "text": caption tokens cond.context [B, L, context_dim] (projected by
    context_embedder) and pooled vector cond.pooled [B, pooled_dim]; guidance dropout (cond.drop_semantic)
    zeroes both, as SD3 trains with empty encodings. conditioning "class": one class token as the context.
    semantic_path "adaln" (SD3's text form, and the additive mechanism for classes) also sums the pooled text
    or class embedding into the adaLN vector; "attention" (the disentangled mechanism, and the published
    class form) leaves the semantic condition to the context stream only. control (ControlEmbedder
    arguments) adds the embedded control values, weighted by w(t), to the adaLN vector."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 16,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        learn_sigma: bool = False,
        conditioning: str = "text",
        context_dim: int = 4096,
        pooled_dim: int = 2048,
        num_classes: int = 1000,
        qk_norm: bool = False,
        pos_embed_max_size: int | None = None,
        semantic_path: str | None = None,
        control: dict | None = None,
        pos_embed_base_size: int | None = None,
        pos_embed_resample: str = "extrapolate",
        dual_attention_layers: tuple[int, ...] = (),
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input size {input_size} is not divisible by patch size {patch_size}")
        if conditioning not in ("text", "class"):
            raise ValueError(f"mmDiT conditioning must be text or class, got {conditioning!r}")
        semantic_path = semantic_path or ("adaln" if conditioning == "text" else "attention")  # as published
        if semantic_path not in ("adaln", "attention"):
            raise ValueError(f"mmDiT semantic_path must be adaln or attention, got {semantic_path!r}")
        self.semantic_path = semantic_path
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size, self.num_heads, self.conditioning = hidden_size, num_heads, conditioning
        # SD3 keeps a table for a larger grid (96 at 1024 px) and uses its centre crop, so other sizes work.
        self.base_size = input_size // patch_size
        self.pos_embed_max_size = pos_embed_max_size or self.base_size
        # A model fine-tuned from another input size may measure its positions on that grid instead (transfer.resample).
        self.pos_base_grid = pos_embed_base_size // patch_size if pos_embed_base_size else None
        self.pos_embed_resample = pos_embed_resample

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if conditioning == "text":
            if semantic_path == "adaln":
                self.y_embedder = VectorEmbedder(pooled_dim, hidden_size)
            self.context_embedder = nn.Linear(context_dim, hidden_size)
        else:
            self.class_embedder = LabelEmbedder(num_classes, hidden_size)  # the context token (and adaLN vector)
        self.control_embedder = ControlEmbedder(hidden_size, **control) if control else None
        self.register_buffer("pos_embed", torch.zeros(1, self.pos_embed_max_size**2, hidden_size))
        bad = [i for i in dual_attention_layers if not 0 <= i < depth - 1]
        if bad:
            raise ValueError(f"mmDiT dual_attention_layers: block {bad[0]} is not one of blocks 0..{depth - 2}")
        self.dual_attention_layers = tuple(sorted(dual_attention_layers))
        self.joint_blocks = nn.ModuleList(
            [
                JointBlock(
                    hidden_size, num_heads, mlp_ratio, qk_norm, pre_only=i == depth - 1, dual=i in dual_attention_layers
                )
                for i in range(depth)
            ]
        )
        self.register_load_state_dict_pre_hook(rename_legacy_keys)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        xavier_init_linears(self)
        M = self.pos_embed_max_size
        positions = np.arange(M, dtype=np.float64) / (M / self.base_size)
        if self.pos_base_grid is not None:  # the M-cell table measured on the base grid, scaled as the input grid is
            positions = grid_positions(M, M * self.pos_base_grid / self.base_size, self.pos_embed_resample)
        self.pos_embed.data.copy_(
            torch.from_numpy(sincos_2d(self.hidden_size, positions, positions)).float().unsqueeze(0)
        )
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.conditioning == "class":
            nn.init.normal_(self.class_embedder.embedding_table.weight, std=0.02)
        zero_init_control(self.control_embedder)
        # adaLN-Zero: every block starts as the identity (both streams), the output as zero.
        for block in self.joint_blocks:
            for stream in (block.x_block, block.context_block):
                nn.init.zeros_(stream.adaLN_modulation[-1].weight)
                nn.init.zeros_(stream.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def cropped_pos_embed(self, h: int, w: int) -> torch.Tensor:
        # [1, h*w, D]: the centre h x w window of the max-size table
        M = self.pos_embed_max_size
        if h > M or w > M:
            raise ValueError(f"a {h}x{w} token grid exceeds pos_embed_max_size {M}")
        top, left = (M - h) // 2, (M - w) // 2
        table = self.pos_embed.reshape(1, M, M, -1)[:, top : top + h, left : left + w, :]
        return table.reshape(1, h * w, -1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        # x [B, C, H, W] latents, t [B] noise level in [0, 1] (SD3: sigma; the embedder sees 1000 * t)
        h, w = patch_grid(x, self.in_channels, self.patch_size, "mmDiT")
        x = self.x_embedder(x) + self.cropped_pos_embed(h, w).to(x.dtype)  # [B, T, D]
        embedder = self.context_embedder if self.conditioning == "text" else self.class_embedder
        pooled_embedder = getattr(self, "y_embedder", None)
        y, context, _ = semantic_inputs(
            cond, self.conditioning, self.semantic_path, embedder, pooled_embedder, class_token=True, name="mmDiT"
        )  # y [B, D] (pooled caption or class) or None; context [B, L, D]: caption tokens or the class token
        c = plus_control(plus(self.t_embedder(t), y), self.control_embedder, cond, t)  # [B, D]
        for block in self.joint_blocks:
            context, x = block(context, x, c)  # joint attention over both streams
        x = self.final_layer(x, c)  # [B, T, p*p*C_out]
        return unpatchify(x, h, w, self.patch_size, self.out_channels)  # [B, C_out, H, W]


# DiT's sizes (each block holds two streams, so about twice DiT's parameters per block), and tiny for tests.
MMDIT_SIZES = {
    "tiny": dict(depth=2, hidden_size=64, num_heads=2),
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
MMDIT_PRESETS = {f"mmDiT-{size}/{p}": dict(arch, patch_size=p) for size, arch in MMDIT_SIZES.items() for p in (2, 4, 8)}
