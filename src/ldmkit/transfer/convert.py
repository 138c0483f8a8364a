"""Weights of any layout -> a built, loaded ldmkit model with its config (what `ldmkit convert`, `ldmkit export`
and the Python API's from_pretrained share). The backbone's spec recognises and renames foreign weights; the
config is the one an ldmkit export wrote beside them (ldmkit_config.yaml), the one an ldmkit checkpoint
records, or the backbone's shipped recipe with the architecture read from the weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.nn as nn
import yaml
from safetensors.torch import save_file as save_safetensors

from ..checkpoint import load_checkpoint, load_weights
from ..config import SHIPPED_CONFIGS, RunConfig, apply_overrides, build, load_config, to_dict, validate
from ..models.registry import BACKBONES, build_model, detect_backbone, semantic_path
from ..models.spec import BackboneSpec, ConversionError
from .checkpoints import LDMKIT_EXTRA, read_weights

LDMKIT_CONFIG = "ldmkit_config.yaml"  # written beside an export: the run's whole config
PARITY_TOLERANCE = 1e-5  # an export whose diffusers outputs differ by more than this is reported


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
    sd = {**{k: v for k, v in model.state_dict().items() if k in spec.kept_on_import}, **sd, **exported_extra(source)}
    load_weights(model, sd, f"weights {source}")
    return model, cfg_dict, layout, spec


def exported_config(source: str | Path) -> dict | None:
    """The config an ldmkit export wrote beside its weights (a diffusers folder, or its transformer/unet). An
    autoencoder path relative to that folder (a pipeline's own vae/) is made absolute."""
    folder = Path(source)
    for candidate in (folder, folder.parent):
        if candidate.is_dir() and (candidate / LDMKIT_CONFIG).is_file():
            cfg = yaml.safe_load((candidate / LDMKIT_CONFIG).read_text())
            vae = (cfg.get("autoencoder") or {}).get("path")
            if vae and not Path(vae).is_absolute() and (candidate / vae).is_dir():
                cfg["autoencoder"]["path"] = str((candidate / vae).resolve())
            return cfg
    return None


def exported_extra(source: str | Path) -> dict:
    """The tensors an ldmkit export kept beside the diffusers weights (LDMKIT_EXTRA), or {}."""
    folder = Path(source)
    for candidate in (folder, folder / "transformer", folder / "unet"):
        if (candidate / LDMKIT_EXTRA).is_file():
            return load_checkpoint(candidate / LDMKIT_EXTRA)
    return {}


def check_exportable(model: nn.Module, cfg_dict: dict, spec: BackboneSpec) -> None:
    """A one-line error unless diffusers has this model: the backbone has a diffusers form and the run uses the
    published conditioning (no control embeddings, the paper's semantic path)."""
    if spec.to_diffusers is None:
        raise ConversionError(spec.no_export)
    published = semantic_path(spec.name, cfg_dict["model"]["conditioning"], "published")
    if getattr(model, "control_embedder", None) is not None or getattr(model, "semantic_path", published) != published:
        raise ConversionError(
            f"this run uses conditioning.mechanism {cfg_dict['conditioning']['mechanism']} (semantic path "
            f"{model.semantic_path}, control embeddings); diffusers has the published conditioning only"
        )


def export_model(model: nn.Module, spec: BackboneSpec, out: Path) -> tuple[nn.Module, dict]:
    """Write the model's diffusers form in out (config.json + safetensors) and what describe_export adds.
    Returns (the diffusers model, its record)."""
    reference, notes = spec.to_diffusers(model)
    out.mkdir(parents=True, exist_ok=True)
    reference.save_pretrained(out)
    return reference, describe_export(model, spec, reference, notes, out)


def describe_export(model: nn.Module, spec: BackboneSpec, reference: nn.Module, notes: list[str], out: Path) -> dict:
    """Beside a written diffusers model: what diffusers does not store (LDMKIT_EXTRA: PixArt's null caption,
    positional tables) and ldmkit.json, the measured gap between the two models on a probe input and notes on its
    cause (a warning when it exceeds PARITY_TOLERANCE). Returns that record."""
    kept = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k in spec.kept_on_import}
    if kept:
        save_safetensors(kept, str(out / LDMKIT_EXTRA))
    ours, theirs = spec.diffusers_probe(model, reference)
    gap, scale = float((ours - theirs).abs().max()), float(ours.abs().mean())
    info = {"converted_by": "ldmkit", "diffusers_output_gap": gap, "mean_abs_output": scale, "notes": notes}
    (out / "ldmkit.json").write_text(json.dumps(info, indent=1))
    if gap > PARITY_TOLERANCE:
        cause = "; ".join(notes) or "see ldmkit.json"
        print(
            f"warning: in diffusers this model's outputs differ from ldmkit's by up to {gap:.3g} (mean |output| "
            f"{scale:.3g}) on a probe input: {cause}. ldmkit loads the folder back exactly",
            file=sys.stderr,
        )
    return info


def export(model: nn.Module, cfg_dict: dict, spec: BackboneSpec, out: str | Path) -> Path:
    """The backbone's diffusers model folder in out (or a one-line error saying why there is none), with the run's
    config beside it so that loading it back restores the same ldmkit model."""
    check_exportable(model, cfg_dict, spec)
    out = Path(out)
    export_model(model, spec, out)
    (out / LDMKIT_CONFIG).write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    return out
