"""Backbone registry: model.name -> the backbone's spec (models/<name>_spec.py), and the model a config builds.
A new backbone is one model file, one spec file, and one line in BACKBONES."""

from __future__ import annotations

import torch.nn as nn

from ..config import CONTROL_SIZES, ConfigError
from . import dit_spec, mdt_spec, mmdit_spec, pixart_spec, unet_spec
from .control import ControlSchedule
from .spec import BackboneSpec, ConversionError

BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        dit_spec.SPEC,
        pixart_spec.SPEC,
        mmdit_spec.SPEC,
        unet_spec.SPEC,
        mdt_spec.SPEC,
    )
}
# Transformer presets may be overridden key by key; the UNet's text context width comes from model.context_dim.
ARCH_OVERRIDES = ("depth", "hidden_size", "num_heads", "patch_size", "decode_layers")
CONDITIONING_HELP = {
    "class": "class labels",
    "pooled_text": "a pooled caption vector in adaLN",
    "text": "caption tokens by attention",
}


def spec_of(model: nn.Module) -> BackboneSpec:
    """The spec of a built backbone (unwrapped: not a DDP or compiled wrapper)."""
    for spec in BACKBONES.values():
        if isinstance(model, spec.model_class):
            return spec
    raise TypeError(f"{type(model).__name__} is not a registered backbone")


def detect_backbone(sd: dict) -> tuple[BackboneSpec, str] | None:
    """(spec, layout) of a foreign state dict, by each backbone's detector; None when no backbone claims it, and a
    one-line ConversionError when several do (never a guess)."""
    found = [(spec, layout) for spec in BACKBONES.values() if (layout := spec.detect(sd)) is not None]
    if len(found) > 1:
        names = ", ".join(f"{spec.name} ({layout})" for spec, layout in found)
        raise ConversionError(f"ambiguous weights: they fit {names}; convert them with the layout's own tools first")
    return found[0] if found else None


def backbone_of_preset(preset: str) -> str:
    """The backbone a preset name belongs to (e.g. 'mmDiT-XL/2' -> 'mmdit')."""
    for name, spec in BACKBONES.items():
        if preset.replace("α", "alpha") in spec.presets:
            return name
    raise KeyError(f"unknown preset {preset!r}")


def preset_names() -> dict[str, list[str]]:
    return {name: sorted(spec.presets) for name, spec in BACKBONES.items()}


def control_spec(conditioning_cfg) -> dict | None:
    """ControlEmbedder arguments from the conditioning config: the configured keys, grouped into low_level and
    high_level, with their schedules (additive: constant weight 1, as summing into adaLN does)."""
    cc = conditioning_cfg
    if cc is None or not cc.control:
        return None
    low = [k for k in cc.control if k in cc.low_level]
    high = [k for k in cc.control if k not in cc.low_level]
    groups = {name: keys for name, keys in (("low_level", low), ("high_level", high)) if keys}
    if cc.mechanism != "disentangled":
        schedules = {g: ControlSchedule("constant") for g in groups}
    else:
        schedules = {
            "low_level": ControlSchedule(cc.low_schedule, cc.low_start, cc.low_end, cc.low_power),
            "high_level": ControlSchedule(cc.high_schedule, cc.high_start, cc.high_end, cc.high_power),
        }
    return dict(
        keys={k: CONTROL_SIZES[k] for k in cc.control},
        groups=groups,
        schedules={g: schedules[g] for g in groups},
        value_scale=cc.value_scale,
    )


def semantic_path(backbone: str, conditioning: str, mechanism: str) -> str:
    """Where the semantic condition enters, 'adaln' (summed into the adaLN / time vector) or 'attention'
    (attended tokens), for a backbone, its conditioning and conditioning.mechanism:
    - published: each backbone as its paper has it (mmDiT text: pooled vector in adaLN plus the tokens);
    - additive: a class or pooled caption is summed into the adaLN vector (mmDiT: as well as its context
      stream, as SD3 does with the pooled text); caption tokens stay attended (they cannot be summed);
    - disentangled: class and caption as attended tokens only; no semantic vector in adaLN."""
    spec = BACKBONES[backbone]
    if conditioning == "pooled_text":
        if mechanism == "disentangled":
            raise ConfigError(
                "config key 'model.conditioning': pooled_text sums the caption into adaLN; the disentangled "
                "mechanism attends to caption tokens: use model.conditioning: text"
            )
        return "adaln"
    if conditioning == "text":
        return "adaln" if spec.pooled_text_with_tokens and mechanism != "disentangled" else "attention"
    if mechanism == "published":
        return spec.published_class_path
    if mechanism == "disentangled" and not spec.attends_class:
        raise ConfigError(
            f"config key 'conditioning.mechanism': {backbone} has no attention to a class token; "
            "it takes published or additive"
        )
    return "adaln" if mechanism == "additive" else "attention"


def backbone_spec(model_cfg) -> BackboneSpec:
    if model_cfg.name not in BACKBONES:
        raise ConfigError(
            f"config key 'model.name': unknown backbone {model_cfg.name!r} (available: {', '.join(BACKBONES)})"
        )
    return BACKBONES[model_cfg.name]


def check_backbone_keys(model_cfg, spec: BackboneSpec) -> None:
    """A model key that only other backbones read, set away from its default, would do nothing: refuse it."""
    defaults = type(model_cfg)()
    specific = {k for other in BACKBONES.values() for k in other.config_keys} - set(spec.config_keys)
    for key in sorted(specific - {"max_tokens"}):  # max_tokens also bounds text.max_length for every backbone
        if getattr(model_cfg, key) != getattr(defaults, key):
            users = ", ".join(name for name, other in BACKBONES.items() if key in other.config_keys)
            raise ConfigError(
                f"config key 'model.{key}': {spec.name} does not use it (it applies to {users}); remove it"
            )


def build_model(model_cfg, conditioning_cfg=None) -> nn.Module:
    """The backbone of model_cfg; conditioning_cfg (the config's `conditioning` section, default: published)
    picks the path of the semantic condition (semantic_path) and adds control embeddings (control_spec)."""
    spec = backbone_spec(model_cfg)
    preset = model_cfg.preset.replace("α", "alpha")  # the paper writes PixArt-α-XL/2
    if model_cfg.conditioning not in spec.conditionings:
        takes = "; ".join(f"{c} ({CONDITIONING_HELP[c]})" for c in spec.conditionings)
        raise ConfigError(f"config key 'model.conditioning': {spec.name} takes {takes}, not {model_cfg.conditioning}")
    if preset not in spec.presets:
        other = next((name for name, entry in BACKBONES.items() if preset in entry.presets), None)
        if other is not None:
            raise ConfigError(
                f"config key 'model.name': preset {model_cfg.preset!r} belongs to {other}; set model.name: {other}"
            )
        raise ConfigError(
            f"config key 'model.preset': unknown preset {model_cfg.preset!r} for {spec.name} "
            f"(available: {', '.join(sorted(spec.presets))})"
        )
    arch = dict(spec.presets[preset])
    for key in ARCH_OVERRIDES:
        value = getattr(model_cfg, key)
        if value is not None:
            if key not in arch:
                raise ConfigError(f"config key 'model.{key}': {spec.name} presets have no {key}")
            arch[key] = value
    if spec.fixed_pos_table and (
        model_cfg.pos_embed_base_size is not None or model_cfg.pos_embed_resample != "extrapolate"
    ):
        raise ConfigError(
            f"config key 'model.pos_embed_base_size': {spec.name} has no fixed positional table "
            f"({spec.fixed_pos_table})"
        )
    mechanism = conditioning_cfg.mechanism if conditioning_cfg is not None else "published"
    if mechanism == "published" and conditioning_cfg is not None and conditioning_cfg.control:
        raise ConfigError(
            "config key 'conditioning.control': the published backbones embed no control values (PixArt "
            "and the SDXL UNet have model.micro_conditions); set conditioning.mechanism: additive or "
            "disentangled"
        )
    if mechanism != "published" and getattr(model_cfg, "micro_conditions", False):
        raise ConfigError(
            f"config key 'model.micro_conditions': the published micro-conditioning; with "
            f"conditioning.mechanism {mechanism} list the control values in conditioning.control instead"
        )
    check_backbone_keys(model_cfg, spec)
    kwargs = {key: getattr(model_cfg, key) for key in spec.config_keys}
    path = semantic_path(spec.name, model_cfg.conditioning, mechanism)
    if spec.attends_class:
        kwargs["semantic_path"] = path
    if mechanism != "published":
        kwargs["control"] = control_spec(conditioning_cfg)
    kwargs = spec.build_kwargs(model_cfg, {**kwargs, **arch})
    try:
        return spec.model_class(
            input_size=model_cfg.input_size,
            in_channels=model_cfg.in_channels,
            learn_sigma=model_cfg.learn_sigma,
            conditioning=model_cfg.conditioning,
            **kwargs,
        )
    except ConfigError:
        raise
    except (RuntimeError, TypeError, ValueError, AssertionError, MemoryError, ZeroDivisionError) as e:
        # Sizes that fit no layer (a width the heads do not divide, a grid the patch does not tile, ...).
        detail = (str(e).splitlines() or [""])[0][:160]
        raise ConfigError(
            f"config section 'model': {model_cfg.preset} cannot be built with these settings "
            f"({type(e).__name__}: {detail})"
        ) from None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(model: nn.Module, tokens_per_caption: int = 120) -> float:
    """Analytic forward FLOPs per image (2 per multiply-add; matmuls, convolutions and attention only, as
    torch.utils.flop_counter counts them). Training costs about 3x this (forward + backward)."""
    return spec_of(model).flops(model, tokens_per_caption)
