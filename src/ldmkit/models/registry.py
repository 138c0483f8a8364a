"""Backbone registry: config -> model. Presets live in each backbone file."""
from __future__ import annotations

import torch.nn as nn

from .dit import DIT_PRESETS, DiT

BACKBONES = {"dit": (DiT, DIT_PRESETS)}


def preset_names() -> dict[str, list[str]]:
    return {name: sorted(presets) for name, (_, presets) in BACKBONES.items()}


def build_model(model_cfg) -> nn.Module:
    from ..config import ConfigError

    if model_cfg.name not in BACKBONES:
        raise ConfigError(f"config key 'model.name': unknown backbone {model_cfg.name!r} (available: {', '.join(BACKBONES)})")
    cls, presets = BACKBONES[model_cfg.name]
    if model_cfg.preset not in presets:
        raise ConfigError(f"config key 'model.preset': unknown preset {model_cfg.preset!r} for {model_cfg.name} (available: {', '.join(sorted(presets))})")
    arch = dict(presets[model_cfg.preset])
    for key in ("depth", "hidden_size", "num_heads", "patch_size"):
        value = getattr(model_cfg, key)
        if value is not None:
            arch[key] = value
    return cls(
        input_size=model_cfg.input_size,
        in_channels=model_cfg.in_channels,
        num_classes=model_cfg.num_classes,
        learn_sigma=model_cfg.learn_sigma,
        timestep_freq_shift=model_cfg.timestep_freq_shift,
        mlp_ratio=model_cfg.mlp_ratio,
        conditioning=model_cfg.conditioning,
        pooled_dim=model_cfg.pooled_dim,
        **arch,
    )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(model: nn.Module) -> float:
    """Analytic forward FLOPs per image of a DiT (2 per multiply-add; matmuls and attention only).
    Training costs about 3x this (forward + backward)."""
    if not isinstance(model, DiT):
        raise NotImplementedError(f"no FLOP count for {type(model).__name__}")
    D, p = model.hidden_size, model.patch_size
    T = (model.input_size // p) ** 2
    mlp_hidden = model.blocks[0].mlp.fc1.out_features
    per_block = 2 * T * (3 * D * D + D * D + 2 * D * mlp_hidden) + 2 * 2 * T * T * D + 2 * D * 6 * D
    patch = 2 * T * model.in_channels * p * p * D
    final = 2 * T * D * p * p * model.out_channels + 2 * D * 2 * D
    time = 2 * (256 * D + D * D)
    return float(len(model.blocks) * per_block + patch + final + time)
