"""Backbone registry: config -> model. Presets live in each backbone file."""
from __future__ import annotations

import torch.nn as nn

from .dit import DIT_PRESETS, DiT
from .mdt import MDT, MDT_PRESETS
from .mmdit import MMDIT_PRESETS, MMDiT
from .pixart import PIXART_PRESETS, PixArt
from .unet import UNET_PRESETS, UNet

# name -> (class, presets, conditionings it takes, config keys it reads beyond input_size, in_channels,
# learn_sigma and conditioning)
BACKBONES = {
    "dit": (DiT, DIT_PRESETS, ("class", "pooled_text", "text"), ("num_classes", "timestep_freq_shift", "pooled_dim", "context_dim", "mlp_ratio",
                                                              "pos_embed_base_size", "pos_embed_resample")),
    "pixart": (PixArt, PIXART_PRESETS, ("class", "text"), ("num_classes", "context_dim", "max_tokens", "micro_conditions", "mlp_ratio",
                                                           "pos_embed_base_size", "pos_embed_resample")),
    "mmdit": (MMDiT, MMDIT_PRESETS, ("class", "text"), ("num_classes", "context_dim", "pooled_dim", "qk_norm", "pos_embed_max_size", "mlp_ratio",
                                                        "pos_embed_base_size", "pos_embed_resample")),
    "unet": (UNet, UNET_PRESETS, ("class", "text"), ("num_classes", "micro_conditions", "pooled_dim")),
    "mdt": (MDT, MDT_PRESETS, ("class", "pooled_text"), ("num_classes", "pooled_dim", "mask_ratio", "mlp_ratio")),
}
# Transformer presets may be overridden key by key; the UNet's text context width comes from model.context_dim.
ARCH_OVERRIDES = ("depth", "hidden_size", "num_heads", "patch_size", "decode_layers")
CONDITIONING_HELP = {"class": "class labels", "pooled_text": "a pooled caption vector in adaLN", "text": "caption tokens by attention"}


def backbone_of_preset(preset: str) -> str:
    """The backbone a preset name belongs to (e.g. 'mmDiT-XL/2' -> 'mmdit')."""
    for name, (_, presets, _, _) in BACKBONES.items():
        if preset.replace("α", "alpha") in presets:
            return name
    raise KeyError(f"unknown preset {preset!r}")


def preset_names() -> dict[str, list[str]]:
    return {name: sorted(presets) for name, (_, presets, _, _) in BACKBONES.items()}


def control_spec(conditioning_cfg) -> dict | None:
    """ControlEmbedder arguments from the conditioning config: the configured keys, grouped into low_level and
    high_level, with their schedules (additive: constant weight 1, as summing into adaLN does)."""
    from .control import ControlSchedule
    from ..config import CONTROL_SIZES

    cc = conditioning_cfg
    if cc is None or not cc.control:
        return None
    low = [k for k in cc.control if k in cc.low_level]
    high = [k for k in cc.control if k not in cc.low_level]
    groups = {name: keys for name, keys in (("low_level", low), ("high_level", high)) if keys}
    if cc.mechanism != "disentangled":
        schedules = {g: ControlSchedule("constant") for g in groups}
    else:
        schedules = {"low_level": ControlSchedule(cc.low_schedule, cc.low_start, cc.low_end, cc.low_power),
                     "high_level": ControlSchedule(cc.high_schedule, cc.high_start, cc.high_end, cc.high_power)}
    return dict(keys={k: CONTROL_SIZES[k] for k in cc.control}, groups=groups, schedules={g: schedules[g] for g in groups},
                value_scale=cc.value_scale)


# Where each backbone's published form puts a class label: DiT and MDT sum it into adaLN; PixArt, mmDiT and
# the LDM UNet give it as an attended token.
PUBLISHED_CLASS_PATH = {"dit": "adaln", "mdt": "adaln", "pixart": "attention", "mmdit": "attention", "unet": "attention"}


def semantic_path(backbone: str, conditioning: str, mechanism: str) -> str:
    """Where the semantic condition enters, 'adaln' (summed into the adaLN / time vector) or 'attention'
    (attended tokens), for a backbone, its conditioning and conditioning.mechanism:
    - published: each backbone as its paper has it (mmDiT text: pooled vector in adaLN plus the tokens);
    - additive: a class or pooled caption is summed into the adaLN vector (mmDiT: as well as its context
      stream, as SD3 does with the pooled text); caption tokens stay attended (they cannot be summed);
    - disentangled: class and caption as attended tokens only; no semantic vector in adaLN."""
    from ..config import ConfigError

    if conditioning == "pooled_text":
        if mechanism == "disentangled":
            raise ConfigError("config key 'model.conditioning': pooled_text sums the caption into adaLN; the disentangled "
                              "mechanism attends to caption tokens: use model.conditioning: text")
        return "adaln"
    if conditioning == "text":
        return "adaln" if backbone == "mmdit" and mechanism != "disentangled" else "attention"
    if mechanism == "published":
        return PUBLISHED_CLASS_PATH[backbone]
    if mechanism == "disentangled" and backbone == "mdt":
        raise ConfigError("config key 'conditioning.mechanism': mdt has no attention to a class token (its blocks are DiT's); "
                          "it takes published or additive")
    return "adaln" if mechanism == "additive" else "attention"


def build_model(model_cfg, conditioning_cfg=None) -> nn.Module:
    """The backbone of model_cfg; conditioning_cfg (the config's `conditioning` section, default: published)
    picks the path of the semantic condition (semantic_path) and adds control embeddings (control_spec)."""
    from ..config import ConfigError

    if model_cfg.name not in BACKBONES:
        raise ConfigError(f"config key 'model.name': unknown backbone {model_cfg.name!r} (available: {', '.join(BACKBONES)})")
    cls, presets, conditionings, extra_keys = BACKBONES[model_cfg.name]
    preset = model_cfg.preset.replace("α", "alpha")  # the paper writes PixArt-α-XL/2
    if model_cfg.conditioning not in conditionings:
        takes = "; ".join(f"{c} ({CONDITIONING_HELP[c]})" for c in conditionings)
        raise ConfigError(f"config key 'model.conditioning': {model_cfg.name} takes {takes}, not {model_cfg.conditioning}")
    if preset not in presets:
        other = next((name for name, entry in BACKBONES.items() if preset in entry[1]), None)
        if other is not None:
            raise ConfigError(f"config key 'model.name': preset {model_cfg.preset!r} belongs to {other}; set model.name: {other}")
        raise ConfigError(f"config key 'model.preset': unknown preset {model_cfg.preset!r} for {model_cfg.name} (available: {', '.join(sorted(presets))})")
    arch = dict(presets[preset])
    for key in ARCH_OVERRIDES:
        value = getattr(model_cfg, key)
        if value is not None:
            if key not in arch:
                raise ConfigError(f"config key 'model.{key}': {model_cfg.name} presets have no {key}")
            arch[key] = value
    if cls is UNet and model_cfg.conditioning == "text":
        arch["context_dim"] = model_cfg.context_dim  # the caption width; class tokens keep the preset's width
    extra = {key: getattr(model_cfg, key) for key in extra_keys}
    if cls in (UNet, MDT) and (model_cfg.pos_embed_base_size is not None or model_cfg.pos_embed_resample != "extrapolate"):
        raise ConfigError(f"config key 'model.pos_embed_base_size': {model_cfg.name} has no fixed positional table "
                          f"({'convolutions only' if cls is UNet else 'its learned tables are resampled by init.pos_embed'})")
    mechanism = conditioning_cfg.mechanism if conditioning_cfg is not None else "published"
    if mechanism == "published" and conditioning_cfg is not None and conditioning_cfg.control:
        raise ConfigError("config key 'conditioning.control': the published backbones embed no control values (PixArt and the SDXL "
                          "UNet have model.micro_conditions); set conditioning.mechanism: additive or disentangled")
    if mechanism != "published" and getattr(model_cfg, "micro_conditions", False):
        raise ConfigError(f"config key 'model.micro_conditions': the published micro-conditioning; with conditioning.mechanism "
                          f"{mechanism} list the control values in conditioning.control instead")
    path = semantic_path(model_cfg.name, model_cfg.conditioning, mechanism)
    if cls is not MDT:
        extra["semantic_path"] = path
    if mechanism != "published":
        extra["control"] = control_spec(conditioning_cfg)
    if cls is PixArt:
        extra["caption_channels"] = extra.pop("context_dim")
    try:
        return cls(input_size=model_cfg.input_size, in_channels=model_cfg.in_channels, learn_sigma=model_cfg.learn_sigma,
                   conditioning=model_cfg.conditioning, **extra, **arch)
    except ConfigError:
        raise
    except (RuntimeError, TypeError, ValueError, AssertionError, MemoryError, ZeroDivisionError) as e:
        # Sizes that fit no layer (a width the heads do not divide, a grid the patch does not tile, ...).
        detail = (str(e).splitlines() or [""])[0][:160]
        raise ConfigError(f"config section 'model': {model_cfg.preset} cannot be built with these settings "
                          f"({type(e).__name__}: {detail})") from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(model: nn.Module, tokens_per_caption: int = 120) -> float:
    """Analytic forward FLOPs per image (2 per multiply-add; matmuls, convolutions and attention only, as
    torch.utils.flop_counter counts them). Training costs about 3x this (forward + backward)."""
    if isinstance(model, DiT):
        return _dit_flops(model, 1 if model.conditioning == "class" else tokens_per_caption)
    if isinstance(model, PixArt):
        return _pixart_flops(model, tokens_per_caption)
    if isinstance(model, MMDiT):
        return _mmdit_flops(model, tokens_per_caption)
    if isinstance(model, UNet):
        return _unet_flops(model, 1 if model.conditioning == "class" else tokens_per_caption)
    if isinstance(model, MDT):
        return _mdt_flops(model)
    raise NotImplementedError(f"no FLOP count for {type(model).__name__}")


def _transformer_block_flops(T: int, D: int, mlp_hidden: int) -> float:
    # qkv + output projection, attention scores and values, MLP
    return 2 * T * (3 * D * D + D * D + 2 * D * mlp_hidden) + 2 * 2 * T * T * D


def _dit_flops(model, L: int) -> float:
    D, p = model.hidden_size, model.patch_size
    T = (model.input_size // p) ** 2
    mlp_hidden = model.blocks[0].mlp.fc1.out_features
    per_block = _transformer_block_flops(T, D, mlp_hidden) + 2 * D * 6 * D  # + adaLN
    if model.semantic_path == "attention":  # cross-attention to the class token or caption tokens: q, kv, proj, attention
        per_block += 2 * T * D * D + 2 * L * 2 * D * D + 2 * T * D * D + 2 * 2 * T * L * D
    patch = 2 * T * model.in_channels * p * p * D
    final = 2 * T * D * p * p * model.out_channels + 2 * D * 2 * D
    time = 2 * (256 * D + D * D)
    cond = 2 * (model.text_embedder.in_dim * D + D * D) if model.conditioning == "pooled_text" else 0
    if model.conditioning == "text":
        cond = 2 * L * model.context_embedder.in_features * D
    return float(len(model.blocks) * per_block + patch + final + time + cond)


def _pixart_flops(model, L: int) -> float:
    D, p = model.hidden_size, model.patch_size
    T = (model.input_size // p) ** 2
    mlp_hidden = model.blocks[0].mlp.fc1.out_features
    if model.conditioning == "class":
        L, caption = 1, 0
    else:
        caption = 2 * L * (model.y_embedder.y_proj.fc1.in_features * D + D * D)
    cross = 2 * T * D * D + 2 * L * 2 * D * D + 2 * T * D * D + 2 * 2 * T * L * D  # q, kv, proj, attention
    if model.semantic_path == "adaln":  # the class is summed into the timestep vector: no cross-attention
        cross = 0
    per_block = _transformer_block_flops(T, D, mlp_hidden) + cross
    patch = 2 * T * model.in_channels * p * p * D
    final = 2 * T * D * p * p * model.out_channels
    time = 2 * (256 * D + D * D) + 2 * D * 6 * D
    if model.micro_conditions:
        time += 3 * 2 * (256 * (D // 3) + (D // 3) ** 2)
    return float(len(model.blocks) * per_block + patch + final + time + caption)


def _mmdit_flops(model, L: int) -> float:
    D, p = model.hidden_size, model.patch_size
    T = (model.input_size // p) ** 2
    mlp_hidden = model.joint_blocks[0].x_block.mlp.fc1.out_features
    if model.conditioning == "class":
        L, embed = 1, 0
    else:
        embed = 2 * L * model.context_embedder.in_features * D
        if model.semantic_path == "adaln":  # the pooled text MLP
            embed += 2 * (model.y_embedder[0].in_features * D + D * D)
    depth = len(model.joint_blocks)
    N = T + L
    stream = lambda n: 2 * n * (3 * D * D + D * D + 2 * D * mlp_hidden) + 2 * D * 6 * D  # qkv, proj, MLP, adaLN
    per_block = stream(T) + stream(L) + 2 * 2 * N * N * D  # both streams, joint attention
    # the last context block is pre-only: qkv and a 2-way modulation only
    pre_only_saving = 2 * L * (D * D + 2 * D * mlp_hidden) + 2 * D * 4 * D
    patch = 2 * T * model.in_channels * p * p * D
    final = 2 * T * D * p * p * model.out_channels + 2 * D * 2 * D
    time = 2 * (256 * D + D * D)
    return float(depth * per_block - pre_only_saving + patch + final + time + embed)


def _unet_flops(model, tokens: int) -> float:
    """Convolutions, projections and attention of the UNet, level by level (each level halves H and W)."""
    from .unet import ResnetBlock, SpatialTransformer

    def conv(cin, cout, k, hw):
        return 2 * cin * cout * k * k * hw

    def resnet(block: ResnetBlock, hw):
        cin, cout = block.conv1.in_channels, block.conv1.out_channels
        skip = conv(cin, cout, 1, hw) if block.conv_shortcut is not None else 0
        return conv(cin, cout, 3, hw) + conv(cout, cout, 3, hw) + skip + 2 * block.time_emb_proj.in_features * cout

    def transformer(st: SpatialTransformer, hw):
        C = st.norm.num_channels
        Dc = st.transformer_blocks[0].attn2.to_k.in_features
        L = hw if model.semantic_path == "adaln" else tokens  # without a class token the second attention is self-attention
        per_block = (2 * hw * 4 * C * C + 2 * 2 * hw * hw * C  # self-attention: q, k, v, out; scores and values
                     + 2 * hw * 2 * C * C + 2 * L * 2 * Dc * C + 2 * 2 * hw * L * C  # cross-attention
                     + 2 * hw * (C * 8 * C + 4 * C * C))  # GEGLU feed-forward
        return 2 * 2 * hw * C * C + len(st.transformer_blocks) * per_block  # + projections in and out

    side = model.input_size
    total = conv(model.in_channels, model.model_channels, 3, side * side) + conv(model.model_channels, model.out_channels, 3, side * side)
    temb = model.time_embedding
    total += 2 * (temb.linear_1.in_features * temb.linear_1.out_features + temb.linear_2.in_features * temb.linear_2.out_features)
    if model.micro_conditions:
        add = model.add_embedding
        total += 2 * (add.linear_1.in_features * add.linear_1.out_features + add.linear_2.in_features * add.linear_2.out_features)
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


def _mdt_flops(model) -> float:
    """The full (sampling) pass; a masked training pass adds the encoder on the kept tokens and the side block."""
    D, p = model.hidden_size, model.patch_size
    T = model.grid**2
    mlp_hidden = model.en_inblocks[0].mlp.fc1.out_features
    blocks = len(model.en_inblocks) + len(model.en_outblocks) + len(model.de_blocks)
    skips = len(model.en_outblocks) + len(model.de_blocks)
    per_block = _transformer_block_flops(T, D, mlp_hidden) + 2 * D * 6 * D
    patch = 2 * T * model.in_channels * p * p * D
    final = 2 * T * D * p * p * model.out_channels + 2 * D * 2 * D
    time = 2 * (256 * D + D * D)
    cond = 2 * (model.text_embedder.in_dim * D + D * D) if model.conditioning == "pooled_text" else 0
    return float(blocks * per_block + skips * 2 * T * 2 * D * D + patch + final + time + cond)
