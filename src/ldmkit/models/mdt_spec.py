"""MDT-v2's spec (see models/spec.py): the official sail-sg/MDT checkpoints share ldmkit's module names, and
its training adds a masked pass (MaskedPass) to every step."""

from __future__ import annotations

import torch

from .mdt import MDT, MDT_PRESETS, draw_token_keep
from .spec import BackboneSpec, ExtraPass, guided_channels_for, overrides_of, passes_tokens, transformer_block_flops


def mdt_arch_from_state_dict(sd: dict) -> dict:
    """The architecture of an official (or ldmkit) MDT-v2 state dict, read from tensor shapes."""
    count = lambda prefix: len({k.split(".")[1] for k in sd if k.startswith(prefix + ".")})  # noqa: E731
    w = sd["x_embedder.proj.weight"]
    hidden, in_channels, patch = w.shape[0], w.shape[1], w.shape[2]
    half, decode = count("en_inblocks"), count("de_blocks")
    return dict(
        hidden_size=hidden,
        in_channels=in_channels,
        patch_size=patch,
        depth=2 * half + decode,
        decode_layers=decode,
        num_heads=sd["en_inblocks.0.attn.rel_pos_bias.relative_position_bias_table"].shape[1],
        num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,
        learn_sigma=sd["final_layer.linear.weight"].shape[0] == 2 * in_channels * patch * patch,
        input_size=int(round(sd["pos_embed"].shape[1] ** 0.5)) * patch,
    )


def mdt_overrides(sd: dict, layout: str, folder_config: dict, **_) -> list[str]:
    arch = mdt_arch_from_state_dict(sd)
    return overrides_of(arch) + [f"data.resolution={arch['input_size'] * 8}"] + guided_channels_for(arch["in_channels"])


class MaskedPass(ExtraPass):
    """MDT-v2's masked latent modelling: each step also trains on the same noisy latents seen through a random
    subset of the tokens (draw_token_keep), and the two losses add."""

    def __init__(self, model: MDT):
        self.tokens, self.mask_ratio = model.grid**2, model.mask_ratio

    def draw(self, batch: int, generator: torch.Generator, device) -> torch.Tensor:
        return draw_token_keep(batch, self.tokens, self.mask_ratio, generator, device)

    def kwargs(self, drawn: torch.Tensor, part: slice) -> dict:
        return {"keep": drawn[part]}


def mdt_flops(model: MDT, tokens_per_caption: int = 0) -> float:
    """The full (sampling) pass; a masked training pass adds the encoder on the kept tokens and the side block."""
    D, p = model.hidden_size, model.patch_size
    T = model.grid**2
    mlp_hidden = model.en_inblocks[0].mlp.fc1.out_features
    blocks = len(model.en_inblocks) + len(model.en_outblocks) + len(model.de_blocks)
    skips = len(model.en_outblocks) + len(model.de_blocks)
    per_block = transformer_block_flops(T, D, mlp_hidden) + 2 * D * 6 * D
    patch = 2 * T * model.in_channels * p * p * D
    final = 2 * T * D * p * p * model.out_channels + 2 * D * 2 * D
    time = 2 * (256 * D + D * D)
    cond = 2 * (model.text_embedder.in_dim * D + D * D) if model.conditioning == "pooled_text" else 0
    return float(blocks * per_block + skips * 2 * T * 2 * D * D + patch + final + time + cond)


SPEC = BackboneSpec(
    name="mdt",
    model_class=MDT,
    presets=MDT_PRESETS,
    conditionings=("class", "pooled_text"),
    config_keys=("num_classes", "pooled_dim", "mask_ratio", "mlp_ratio"),
    published_class_path="adaln",
    attends_class=False,
    blocks=lambda model: [*model.en_inblocks, *model.en_outblocks, *model.de_blocks, *model.sideblocks],
    skip_block=passes_tokens,
    flops=mdt_flops,
    recipe="imagenet256/mdt_xl2.yaml",
    fixed_pos_table="its learned tables are resampled by init.pos_embed",
    class_tables=("y_embedder.embedding_table.weight",),
    text_embedders=("text_embedder.",),
    detect=lambda sd: "official" if "en_inblocks.0.attn.qkv.weight" in sd else None,
    import_overrides=mdt_overrides,
    no_export="diffusers has no MDT model; convert to ldmkit",
    extra_pass=lambda model: MaskedPass(model) if model.mask_ratio is not None else None,
)
