"""The UNet's spec (see models/spec.py), and its weights between ldmkit and diffusers' `UNet2DConditionModel`.

ldmkit's UNet uses diffusers' module names, so the state dicts map one to one; the class-token embedder
(`class_embedder`, LDM's ClassEmbedder) has no diffusers counterpart (diffusers' UNet takes the context
tokens from outside) and is kept on import.
"""

from __future__ import annotations

import torch

from ..conditioning.cond import Cond
from .spec import BackboneSpec, ConversionError, probe_inputs
from .unet import MICRO_CONDITIONS, UNET_PRESETS, ResnetBlock, SpatialTransformer, UNet

UNET_ONLY = ("class_embedder.",)


def unet_to_diffusers(sd: dict) -> dict:
    return {k: v.contiguous() for k, v in sd.items() if not k.startswith(UNET_ONLY)}


def unet_from_diffusers(sd: dict) -> dict:
    if "conv_in.weight" not in sd or "time_embedding.linear_1.weight" not in sd:
        raise ConversionError("not a diffusers UNet2DConditionModel state dict (no conv_in / time_embedding)")
    unsupported = [k for k in sd if k.startswith(("class_embedding.", "encoder_hid_proj.", "time_embed_act"))]
    if unsupported:
        raise ConversionError(f"UNet2DConditionModel with {unsupported[0].split('.')[0]} is not part of ldmkit's UNet")
    return dict(sd)


def is_diffusers_unet(sd: dict) -> bool:
    return "conv_in.weight" in sd and "time_embedding.linear_1.weight" in sd


def unet_diffusers_config(model) -> dict:
    """The UNet2DConditionModel config of an ldmkit UNet."""
    down = [block for block in model.down_blocks]
    depth = [len(b.attentions[0].transformer_blocks) if hasattr(b, "attentions") else 0 for b in down]
    heads = [b.attentions[0].transformer_blocks[0].attn1.num_heads if hasattr(b, "attentions") else 1 for b in down]
    mid = model.mid_block.attentions[0]
    heads[-1] = mid.transformer_blocks[0].attn1.num_heads
    first = model.down_blocks[0].resnets[0]
    config = dict(
        sample_size=model.input_size,
        in_channels=model.in_channels,
        out_channels=model.out_channels,
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth],
        up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depth)],
        block_out_channels=list(model.block_out_channels),
        layers_per_block=len(model.down_blocks[0].resnets),
        norm_num_groups=first.norm1.num_groups,
        cross_attention_dim=mid.transformer_blocks[0].attn2.to_k.in_features,
        transformer_layers_per_block=[d or 1 for d in depth[:-1]] + [len(mid.transformer_blocks)],
        attention_head_dim=heads,
        use_linear_projection=mid.linear_projection,
    )
    if model.micro_conditions:
        config.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=model.micro_embed_dim,
            projection_class_embeddings_input_dim=model.add_embedding.linear_1.in_features,
        )
    return config


def unet_overrides(config: dict) -> list[str]:
    """ldmkit config overrides for a diffusers UNet2DConditionModel config.json: its architecture must be one
    of the UNet presets (matched by channels, blocks, depths, heads, projection and groups); sizes, context
    width and SDXL micro-conditioning come from config.json."""
    if not config:
        raise ConversionError("a diffusers UNet folder needs its config.json to be converted")
    levels = len(config.get("block_out_channels", ()))
    given = {
        "block_out_channels": list(config.get("block_out_channels", ())),
        "layers_per_block": config.get("layers_per_block", 2),
        "down_block_types": list(config.get("down_block_types", ())),
        "use_linear_projection": config.get("use_linear_projection", False),
        "transformer_layers_per_block": _per_level(config.get("transformer_layers_per_block", 1), levels),
        "attention_head_dim": _per_level(config.get("attention_head_dim", 8), levels),
        "norm_num_groups": config.get("norm_num_groups", 32),
    }
    for name, preset in UNET_PRESETS.items():
        if len(preset["block_out_channels"]) != levels:
            continue
        with torch.device("meta"):
            candidate = UNet(input_size=2**levels, conditioning="text", **{**preset, "context_dim": 8})
        reference = unet_diffusers_config(candidate)
        if all(given[k] == reference[k] for k in given):
            size, in_channels = config.get("sample_size", 64), config.get("in_channels", 4)
            micro = config.get("addition_embed_type") == "text_time"
            out = [
                f"model.preset={name}",
                f"model.input_size={size}",
                f"model.in_channels={in_channels}",
                f"model.learn_sigma={str(config.get('out_channels', in_channels) == 2 * in_channels).lower()}",
                f"model.context_dim={config.get('cross_attention_dim', 768)}",
                f"model.micro_conditions={str(micro).lower()}",
                f"data.resolution={size * 8}",
            ]
            if micro:
                time_embed_dim = config.get("addition_time_embed_dim", 256)
                out.append(f"model.pooled_dim={config['projection_class_embeddings_input_dim'] - 6 * time_embed_dim}")
            return out
    raise ConversionError(
        f"the UNet with block_out_channels {given['block_out_channels']} matches no ldmkit UNet preset "
        f"({', '.join(UNET_PRESETS)})"
    )


def _per_level(value, levels: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def unet_to_diffusers_model(model) -> tuple[object, list[str]]:
    from diffusers import UNet2DConditionModel

    if model.conditioning != "text":
        raise ConversionError(
            "diffusers' UNet2DConditionModel takes context tokens; export a text-conditional UNet "
            "(a class-conditional UNet's class-token embedder has no diffusers counterpart)"
        )
    ref = UNet2DConditionModel(**unet_diffusers_config(model))
    ref.load_state_dict(unet_to_diffusers(model.state_dict()), strict=True)
    return ref.eval(), []


@torch.no_grad()
def unet_probe(model, reference) -> tuple[torch.Tensor, torch.Tensor]:
    """(ldmkit's output, diffusers') on the same latents, noise levels, caption tokens with padding masks and, with
    SDXL micro-conditions, the pooled caption and sizes."""
    x, t, g = probe_inputs(model)
    B, L = len(x), 8
    context = torch.randn(B, L, reference.config.cross_attention_dim, generator=g)
    mask = torch.arange(L)[None] < torch.tensor([L, L // 2])[:, None]
    cond, added = Cond(context=context, context_mask=mask), None
    if model.micro_conditions:
        pooled_dim = reference.config.projection_class_embeddings_input_dim - 6 * model.micro_embed_dim
        cond.pooled = torch.randn(B, pooled_dim, generator=g)
        sizes = torch.tensor([[512.0, 768.0], [256.0, 256.0]])
        cond.control = {"original_size": sizes, "crop_top_left": sizes * 0.1, "target_size": sizes.flip(1)}
        time_ids = torch.cat([cond.control[k] for k in MICRO_CONDITIONS], dim=1)
        added = {"text_embeds": cond.pooled, "time_ids": time_ids}
    steps = (t * 1000).round()
    ours = model.eval()(x, steps / 1000, cond)
    theirs = reference(
        x, steps, encoder_hidden_states=context, encoder_attention_mask=mask, added_cond_kwargs=added
    ).sample
    return ours, theirs


def unet_pipeline(model) -> str:
    return "StableDiffusionXLPipeline" if model.micro_conditions else "StableDiffusionPipeline"


def unet_kwargs(model_cfg, kwargs: dict) -> dict:
    if model_cfg.conditioning == "text":
        kwargs["context_dim"] = model_cfg.context_dim  # the caption width; class tokens keep the preset's width
    return kwargs


def unet_flops(model: UNet, tokens: int) -> float:
    """Convolutions, projections and attention of the UNet, level by level (each level halves H and W)."""
    tokens = 1 if model.conditioning == "class" else tokens

    def conv(cin, cout, k, hw):
        return 2 * cin * cout * k * k * hw

    def resnet(block: ResnetBlock, hw):
        cin, cout = block.conv1.in_channels, block.conv1.out_channels
        skip = conv(cin, cout, 1, hw) if block.conv_shortcut is not None else 0
        return conv(cin, cout, 3, hw) + conv(cout, cout, 3, hw) + skip + 2 * block.time_emb_proj.in_features * cout

    def transformer(st: SpatialTransformer, hw):
        C = st.norm.num_channels
        Dc = st.transformer_blocks[0].attn2.to_k.in_features
        L = (
            hw if model.semantic_path == "adaln" else tokens
        )  # without a class token the second attention is self-attention
        per_block = (
            2 * hw * 4 * C * C
            + 2 * 2 * hw * hw * C  # self-attention: q, k, v, out; scores and values
            + 2 * hw * 2 * C * C
            + 2 * L * 2 * Dc * C
            + 2 * 2 * hw * L * C  # cross-attention
            + 2 * hw * (C * 8 * C + 4 * C * C)
        )  # GEGLU feed-forward
        return 2 * 2 * hw * C * C + len(st.transformer_blocks) * per_block  # + projections in and out

    side = model.input_size
    total = conv(model.in_channels, model.model_channels, 3, side * side) + conv(
        model.model_channels, model.out_channels, 3, side * side
    )
    temb = model.time_embedding
    total += 2 * (
        temb.linear_1.in_features * temb.linear_1.out_features + temb.linear_2.in_features * temb.linear_2.out_features
    )
    if model.micro_conditions:
        add = model.add_embedding
        total += 2 * (
            add.linear_1.in_features * add.linear_1.out_features + add.linear_2.in_features * add.linear_2.out_features
        )
    for level, block in enumerate(model.down_blocks):
        hw = (side >> level) ** 2
        for i, r in enumerate(block.resnets):
            total += resnet(r, hw) + (transformer(block.attentions[i], hw) if hasattr(block, "attentions") else 0)
        if block.downsamplers is not None:
            c = block.downsamplers[0].conv.in_channels
            total += conv(c, c, 3, (side >> (level + 1)) ** 2)
    hw = (side >> (len(model.down_blocks) - 1)) ** 2
    total += sum(resnet(r, hw) for r in model.mid_block.resnets) + transformer(model.mid_block.attentions[0], hw)
    for i, block in enumerate(model.up_blocks):
        level = len(model.up_blocks) - 1 - i
        hw = (side >> level) ** 2
        for j, r in enumerate(block.resnets):
            total += resnet(r, hw) + (transformer(block.attentions[j], hw) if hasattr(block, "attentions") else 0)
        if block.upsamplers is not None:
            c = block.upsamplers[0].conv.in_channels
            total += conv(c, c, 3, (side >> (level - 1)) ** 2)
    return float(total)


SPEC = BackboneSpec(
    name="unet",
    model_class=UNet,
    presets=UNET_PRESETS,
    conditionings=("class", "text"),
    config_keys=("num_classes", "micro_conditions", "pooled_dim", "context_dim"),
    published_class_path="attention",
    blocks=lambda model: [*model.down_blocks, *model.up_blocks, model.mid_block],
    flops=unet_flops,
    recipe="cc12m256/unet_ldm.yaml",
    build_kwargs=unet_kwargs,
    fixed_pos_table="convolutions only",
    class_tables=("class_embedder.embedding_table.weight", "class_embedding.embedding_table.weight"),
    detect=lambda sd: "diffusers" if is_diffusers_unet(sd) else None,
    import_weights=lambda sd, layout: unet_from_diffusers(sd),
    import_overrides=lambda sd, layout, folder_config, **_: unet_overrides(folder_config),
    to_diffusers=unet_to_diffusers_model,
    diffusers_probe=unet_probe,
    diffusers_pipeline=unet_pipeline,
    diffusers_folder="unet",
)
