"""Weights of any layout -> a built, loaded ldmkit model with its config (what `ldmkit convert`, `ldmkit export`
and the Python API's from_pretrained share). The backbone's spec recognises and renames foreign weights; the
config is the one an ldmkit export wrote beside them (ldmkit_config.yaml), the one an ldmkit checkpoint
records, or the backbone's shipped recipe with the architecture read from the weights."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn
import yaml

from ..checkpoint import load_weights
from ..config import SHIPPED_CONFIGS, RunConfig, apply_overrides, build, load_config, to_dict, validate
from ..models.registry import BACKBONES, build_model, detect_backbone, semantic_path
from ..models.spec import BackboneSpec
from .checkpoints import read_weights

LDMKIT_CONFIG = "ldmkit_config.yaml"  # written beside an export: the run's whole config


def load_any(
    source: str | Path,
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    trust_pickle: bool = False,
    **options,
) -> tuple[nn.Module, dict, str, BackboneSpec]:
    """(model with the weights loaded, resolved config dict, source layout, backbone spec). options go to the
    backbone's import_overrides (DiT: num_heads, timestep_freq_shift)."""
    sd, layout, embedded, folder_config = read_weights(source, trust_pickle=trust_pickle)
    overrides = list(overrides or [])
    written = exported_config(source)
    if layout == "ldmkit" or (written is not None and config is None):
        recorded = embedded if layout == "ldmkit" else written
        cfg = build(RunConfig, apply_overrides(recorded, overrides))
        validate(cfg)
        cfg_dict = to_dict(cfg)
        spec = BACKBONES[cfg.model.name]
        if layout != "ldmkit":
            sd = spec.import_weights(sd, layout)
    else:
        spec = detect_backbone(sd)[0]
        sd = spec.import_weights(sd, layout)
        described = spec.import_overrides(sd, layout, folder_config, **options)
        cfg_dict = to_dict(load_config(config or (SHIPPED_CONFIGS / spec.recipe), described + overrides))
    run_cfg = build(RunConfig, cfg_dict)
    model = build_model(run_cfg.model, run_cfg.conditioning)
    # Tensors the source layout does not carry (fixed positional tables, PixArt's null caption) keep the new
    # model's own values.
    sd = {**{k: v for k, v in model.state_dict().items() if k in spec.kept_on_import}, **sd}
    load_weights(model, sd, f"weights {source}")
    return model, cfg_dict, layout, spec


def exported_config(source: str | Path) -> dict | None:
    """The config an ldmkit export wrote beside its weights (a diffusers folder, or its transformer/unet)."""
    folder = Path(source)
    for candidate in (folder, folder.parent):
        if candidate.is_dir() and (candidate / LDMKIT_CONFIG).is_file():
            return yaml.safe_load((candidate / LDMKIT_CONFIG).read_text())
    return None


def export(model: nn.Module, cfg_dict: dict, spec: BackboneSpec, out: str | Path) -> Path:
    """The backbone's diffusers form in out (or a one-line error saying why there is none), with the run's config
    beside it so that loading it back restores the same ldmkit model."""
    if spec.export_weights is None:
        raise ValueError(spec.no_export)
    published = semantic_path(spec.name, cfg_dict["model"]["conditioning"], "published")
    if getattr(model, "control_embedder", None) is not None or getattr(model, "semantic_path", published) != published:
        raise ValueError(
            f"this run uses conditioning.mechanism {cfg_dict['conditioning']['mechanism']} (semantic path "
            f"{model.semantic_path}, control embeddings); diffusers has the published conditioning only"
        )
    out = Path(out)
    spec.export_weights(model, out)
    (out / LDMKIT_CONFIG).write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    return out
