"""Analytic FLOPs per image agree with torch.utils.flop_counter within 5% for every backbone."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from ldmkit.conditioning.cond import Cond
from ldmkit.models.dit import DiT
from ldmkit.models.mdt import MDT
from ldmkit.models.mmdit import MMDiT
from ldmkit.models.pixart import PixArt
from ldmkit.models.registry import flops_per_image
from ldmkit.models.unet import UNET_PRESETS, UNet


def counted(model, x, cond):
    # The math attention kernel runs as matmuls the counter sees (its CPU fused kernel is not counted).
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(x, torch.rand(x.shape[0]), cond)
    return counter.get_total_flops() / x.shape[0]


@pytest.mark.parametrize(
    "model,cond",
    [
        (
            DiT(input_size=32, patch_size=2, in_channels=4, hidden_size=384, depth=4, num_heads=6),
            Cond(class_labels=torch.tensor([1, 2])),
        ),
        (
            DiT(
                input_size=32,
                patch_size=4,
                in_channels=4,
                hidden_size=256,
                depth=2,
                num_heads=4,
                conditioning="pooled_text",
                pooled_dim=384,
            ),
            Cond(pooled=torch.randn(2, 384)),
        ),
        (
            PixArt(
                input_size=32,
                patch_size=2,
                hidden_size=384,
                depth=4,
                num_heads=6,
                caption_channels=512,
                max_tokens=120,
                micro_conditions=True,
            ),
            Cond(
                context=torch.randn(2, 120, 512),
                control={"original_size": torch.full((2, 2), 256.0), "target_size": torch.full((2, 2), 32.0)},
            ),
        ),
        (
            PixArt(input_size=32, patch_size=2, hidden_size=384, depth=4, num_heads=6, conditioning="class"),
            Cond(class_labels=torch.tensor([1, 2])),
        ),
        (
            MMDiT(
                input_size=32,
                patch_size=2,
                in_channels=16,
                hidden_size=384,
                depth=4,
                num_heads=6,
                context_dim=512,
                pooled_dim=256,
            ),
            Cond(context=torch.randn(2, 120, 512), pooled=torch.randn(2, 256)),
        ),
        (
            MMDiT(
                input_size=32, patch_size=2, in_channels=4, hidden_size=384, depth=4, num_heads=6, conditioning="class"
            ),
            Cond(class_labels=torch.tensor([1, 2])),
        ),
        (UNet(input_size=32, in_channels=4, **UNET_PRESETS["UNet-S"]), Cond(class_labels=torch.tensor([1, 2]))),
        (
            UNet(
                input_size=32,
                in_channels=4,
                conditioning="text",
                micro_conditions=True,
                pooled_dim=64,
                block_out_channels=(64, 128, 256),
                transformer_depth=(0, 2, 3),
                head_channels=32,
                context_dim=96,
                linear_projection=True,
            ),
            Cond(
                context=torch.randn(2, 120, 96),
                pooled=torch.randn(2, 64),
                control={k: torch.full((2, 2), 64.0) for k in ("original_size", "crop_top_left", "target_size")},
            ),
        ),
        (
            MDT(input_size=32, patch_size=2, hidden_size=384, depth=6, num_heads=6, decode_layers=2),
            Cond(class_labels=torch.tensor([1, 2])),
        ),
        (
            MDT(
                input_size=32,
                patch_size=2,
                hidden_size=384,
                depth=6,
                num_heads=6,
                decode_layers=2,
                conditioning="pooled_text",
                pooled_dim=256,
            ),
            Cond(pooled=torch.randn(2, 256)),
        ),
        # the mechanisms' other semantic paths (class as an attended token or summed into adaLN; text without pooled)
        (
            DiT(
                input_size=32,
                patch_size=2,
                in_channels=4,
                hidden_size=384,
                depth=4,
                num_heads=6,
                semantic_path="attention",
            ),
            Cond(class_labels=torch.tensor([1, 2])),
        ),
        (
            DiT(
                input_size=32,
                patch_size=2,
                in_channels=4,
                hidden_size=384,
                depth=4,
                num_heads=6,
                conditioning="text",
                semantic_path="attention",
                context_dim=512,
            ),
            Cond(context=torch.randn(2, 120, 512)),
        ),
        (
            PixArt(
                input_size=32,
                patch_size=2,
                hidden_size=384,
                depth=4,
                num_heads=6,
                conditioning="class",
                semantic_path="adaln",
            ),
            Cond(class_labels=torch.tensor([1, 2])),
        ),
        (
            MMDiT(
                input_size=32,
                patch_size=2,
                in_channels=16,
                hidden_size=384,
                depth=4,
                num_heads=6,
                context_dim=512,
                semantic_path="attention",
            ),
            Cond(context=torch.randn(2, 120, 512)),
        ),
        (
            UNet(input_size=32, in_channels=4, semantic_path="adaln", **UNET_PRESETS["UNet-S"]),
            Cond(class_labels=torch.tensor([1, 2])),
        ),
    ],
    ids=[
        "dit",
        "dit-pooled-text",
        "pixart-ms",
        "pixart-class",
        "mmdit-text",
        "mmdit-class",
        "unet-class",
        "unet-sdxl-like",
        "mdt",
        "mdt-text",
        "dit-class-attention",
        "dit-text",
        "pixart-class-adaln",
        "mmdit-text-attention",
        "unet-class-adaln",
    ],
)
def test_analytic_flops_match_the_counter(model, cond):
    x = torch.randn(2, model.in_channels, model.input_size, model.input_size)
    analytic, measured = flops_per_image(model), counted(model, x, cond)
    assert abs(analytic - measured) / measured < 0.05, (analytic, measured)
