"""PixArt-alpha's spec (see models/spec.py), and its weights between ldmkit (the official PixArt-alpha module
names) and diffusers' `PixArtTransformer2DModel`.

Not carried by diffusers: the null caption `y_embedder.y_embedding` (diffusers' pipelines encode an empty
prompt instead) and the fixed `pos_embed` table (recomputed from the config); importing keeps ldmkit's own.
"""

from __future__ import annotations

import torch

from ..conditioning.cond import Cond
from .pixart import PIXART_PRESETS, PixArt
from .spec import (
    BackboneSpec,
    ConversionError,
    block_count,
    copy_renamed,
    cross_attention_flops,
    passes_tokens,
    probe_inputs,
    transformer_block_flops,
)

# ldmkit name -> diffusers name, for tensors that map one to one (per-block names use "{i}").
_RENAMES = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
    "t_block.1": "adaln_single.linear",
    "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
    "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
    "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
    "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "final_layer.linear": "proj_out",
}
_BLOCK_RENAMES = {
    "attn.proj": "attn1.to_out.0",
    "cross_attn.q_linear": "attn2.to_q",
    "cross_attn.proj": "attn2.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}


def pixart_to_diffusers(sd: dict) -> dict:
    out = copy_renamed(sd, _RENAMES, {})
    out["scale_shift_table"] = sd["final_layer.scale_shift_table"]
    for i in range(block_count(sd, "blocks.")):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        out[dst + "scale_shift_table"] = sd[src + "scale_shift_table"]
        copy_renamed(sd, {src + a: dst + b for a, b in _BLOCK_RENAMES.items()}, out)
        for part in ("weight", "bias"):
            q, k, v = sd[f"{src}attn.qkv.{part}"].chunk(3)
            out[f"{dst}attn1.to_q.{part}"], out[f"{dst}attn1.to_k.{part}"], out[f"{dst}attn1.to_v.{part}"] = q, k, v
            k, v = sd[f"{src}cross_attn.kv_linear.{part}"].chunk(2)
            out[f"{dst}attn2.to_k.{part}"], out[f"{dst}attn2.to_v.{part}"] = k, v
    return {k: v.contiguous() for k, v in out.items()}


def pixart_from_diffusers(sd: dict) -> dict:
    if "adaln_single.linear.weight" not in sd or "caption_projection.linear_1.weight" not in sd:
        raise ConversionError(
            "not a diffusers PixArtTransformer2DModel state dict (no adaln_single / caption_projection)"
        )
    out = copy_renamed(sd, _RENAMES, {}, reverse=True)
    out["final_layer.scale_shift_table"] = sd["scale_shift_table"]
    for i in range(block_count(sd, "transformer_blocks.")):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        out[dst + "scale_shift_table"] = sd[src + "scale_shift_table"]
        copy_renamed(sd, {dst + a: src + b for a, b in _BLOCK_RENAMES.items()}, out, reverse=True)
        for part in ("weight", "bias"):
            out[f"{dst}attn.qkv.{part}"] = torch.cat([sd[f"{src}attn1.to_{n}.{part}"] for n in "qkv"])
            out[f"{dst}cross_attn.kv_linear.{part}"] = torch.cat([sd[f"{src}attn2.to_{n}.{part}"] for n in "kv"])
    return out


def pixart_diffusers_config(model) -> dict:
    """The PixArtTransformer2DModel config of an ldmkit PixArt (text-conditional)."""
    return dict(
        num_attention_heads=model.num_heads,
        attention_head_dim=model.hidden_size // model.num_heads,
        in_channels=model.in_channels,
        out_channels=model.out_channels,
        num_layers=len(model.blocks),
        sample_size=model.input_size,
        patch_size=model.patch_size,
        caption_channels=model.y_embedder.y_proj.fc1.in_features,
        cross_attention_dim=model.hidden_size,
        use_additional_conditions=model.micro_conditions,
        interpolation_scale=model.pe_interpolation,
        norm_eps=1e-6,
    )


def is_diffusers_pixart(sd: dict) -> bool:
    return "adaln_single.linear.weight" in sd


def pixart_overrides(config: dict) -> list[str]:
    """ldmkit config overrides describing the PixArtTransformer2DModel of a diffusers config.json."""
    if not config:
        raise ConversionError("a diffusers PixArt folder needs its config.json (heads, sample size) to be converted")
    heads, head_dim = config.get("num_attention_heads", 16), config.get("attention_head_dim", 72)
    in_channels = config.get("in_channels", 4)
    out_channels = config.get("out_channels") or in_channels
    size = config.get("sample_size", 128)
    micro = config.get("use_additional_conditions")
    micro = size == 128 if micro is None else micro  # diffusers' default rule
    return [
        f"model.input_size={size}",
        f"model.in_channels={in_channels}",
        f"model.learn_sigma={str(out_channels == 2 * in_channels).lower()}",
        f"model.depth={config.get('num_layers', 28)}",
        f"model.hidden_size={heads * head_dim}",
        f"model.num_heads={heads}",
        f"model.patch_size={config.get('patch_size', 2)}",
        f"model.context_dim={config.get('caption_channels') or 4096}",
        f"model.micro_conditions={str(micro).lower()}",
        f"data.resolution={size * 8}",
    ]


def pixart_to_diffusers_model(model) -> tuple[object, list[str]]:
    """A text-conditional ldmkit PixArt as a diffusers PixArtTransformer2DModel."""
    from diffusers import PixArtTransformer2DModel

    if model.conditioning != "text":
        raise ConversionError(
            "diffusers' PixArtTransformer2DModel is text-conditional; a class-conditional PixArt has no diffusers form"
        )
    ref = PixArtTransformer2DModel(**pixart_diffusers_config(model))
    missing, unexpected = ref.load_state_dict(pixart_to_diffusers(model.state_dict()), strict=False)
    missing = [k for k in missing if "pos_embed.pos_embed" not in k]
    if missing or unexpected:
        raise ConversionError(
            f"export does not fit PixArtTransformer2DModel: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    notes = [
        "diffusers' PixArt has no learned null caption (y_embedder.y_embedding): its pipeline guides with the "
        "encoded empty prompt; ldmkit keeps the null caption in transformer/ldmkit_extra.safetensors"
    ]
    return ref.eval(), notes


@torch.no_grad()
def pixart_probe(model, reference) -> tuple[torch.Tensor, torch.Tensor]:
    """(ldmkit's output, diffusers') on the same latents, noise levels, captions with padding masks and, with
    micro-conditions, sizes."""
    x, t, g = probe_inputs(model)
    B, L = len(x), 8
    caption = torch.randn(B, L, reference.config.caption_channels, generator=g)
    mask = torch.arange(L)[None] < torch.tensor([L, L // 2])[:, None]
    control = {"original_size": torch.tensor([[512.0, 768.0], [256.0, 256.0]]), "target_size": x.new_full((B, 2), 32)}
    added = {"resolution": None, "aspect_ratio": None}
    if model.micro_conditions:
        target = control["target_size"]
        added = {"resolution": control["original_size"], "aspect_ratio": target[:, :1] / target[:, 1:]}
    steps = (t * 1000).round()
    ours = model.eval()(x, steps / 1000, Cond(context=caption, context_mask=mask, control=control))
    theirs = reference(
        x, encoder_hidden_states=caption, encoder_attention_mask=mask, timestep=steps, added_cond_kwargs=added
    ).sample
    return ours, theirs


def pixart_kwargs(model_cfg, kwargs: dict) -> dict:
    kwargs["caption_channels"] = kwargs.pop("context_dim")  # PixArt-alpha's name for the caption width
    return kwargs


def pixart_flops(model: PixArt, L: int) -> float:
    D, p = model.hidden_size, model.patch_size
    T = (model.input_size // p) ** 2
    mlp_hidden = model.blocks[0].mlp.fc1.out_features
    if model.conditioning == "class":
        L, caption = 1, 0
    else:
        caption = 2 * L * (model.y_embedder.y_proj.fc1.in_features * D + D * D)
    cross = cross_attention_flops(T, L, D)
    if model.semantic_path == "adaln":  # the class is summed into the timestep vector: no cross-attention
        cross = 0
    per_block = transformer_block_flops(T, D, mlp_hidden) + cross
    patch = 2 * T * model.in_channels * p * p * D
    final = 2 * T * D * p * p * model.out_channels
    time = 2 * (256 * D + D * D) + 2 * D * 6 * D
    if model.micro_conditions:
        time += 3 * 2 * (256 * (D // 3) + (D // 3) ** 2)
    return float(len(model.blocks) * per_block + patch + final + time + caption)


SPEC = BackboneSpec(
    name="pixart",
    model_class=PixArt,
    presets=PIXART_PRESETS,
    conditionings=("class", "text"),
    config_keys=(
        "num_classes",
        "context_dim",
        "max_tokens",
        "micro_conditions",
        "mlp_ratio",
        "pos_embed_base_size",
        "pos_embed_resample",
    ),
    published_class_path="attention",
    blocks=lambda model: list(model.blocks),
    skip_block=passes_tokens,
    flops=pixart_flops,
    recipe="cc12m256/pixart_xl2.yaml",
    build_kwargs=pixart_kwargs,
    class_tables=("y_embedder.embedding_table.weight",),
    text_embedders=("y_embedder.y_proj.", "y_embedder.y_embedding"),
    detect=lambda sd: "diffusers" if is_diffusers_pixart(sd) else None,
    import_weights=lambda sd, layout: pixart_from_diffusers(sd),
    import_overrides=lambda sd, layout, folder_config, **_: pixart_overrides(folder_config),
    kept_on_import=("pos_embed", "y_embedder.y_embedding"),
    to_diffusers=pixart_to_diffusers_model,
    diffusers_probe=pixart_probe,
    diffusers_pipeline=lambda model: "PixArtAlphaPipeline",
)
