"""Reading weight files of every layout: an ldmkit checkpoint, or a backbone's foreign layouts (official
code, diffusers), recognised by the backbone specs' detectors (models/<name>_spec.py holds the mappings)."""

from __future__ import annotations

import json
from pathlib import Path

from ..checkpoint import is_sharded, load_checkpoint, load_file
from ..models.registry import detect_backbone
from ..models.spec import ConversionError

LDMKIT_EXTRA = "ldmkit_extra.safetensors"  # beside an ldmkit export's diffusers weights: not the model's weights


OFFICIAL_PREFIX = "model.diffusion_model."  # SD3's all-in-one files: the MMDiT beside the VAE and text encoders


def unwrap_official(obj) -> dict:
    """An official checkpoint is a bare state dict; a DiT train.py checkpoint nests it (EMA preferred); SD3's files
    may prefix the denoiser's tensors with model.diffusion_model. (the rest, VAE and text encoders, is left out)."""
    if isinstance(obj, dict) and "ema" in obj and isinstance(obj["ema"], dict):
        return obj["ema"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj["model"]
    if isinstance(obj, dict) and any(isinstance(k, str) and k.startswith(OFFICIAL_PREFIX) for k in obj):
        return {k[len(OFFICIAL_PREFIX) :]: v for k, v in obj.items() if k.startswith(OFFICIAL_PREFIX)}
    return obj


def read_weights(path: str | Path, trust_pickle: bool = False) -> tuple[dict, str, dict | None, dict]:
    """Load weights from a file or folder; returns (state dict, layout, embedded ldmkit config or None,
    the diffusers config.json beside the weights or {}). Files are read without running code (safetensors or
    weights_only; see ldmkit.checkpoint.load_file), unless trust_pickle.
    Layouts: 'ldmkit' (an ldmkit checkpoint), 'official' (a backbone's reference code), 'diffusers'."""
    path = Path(path)
    folder_config = {}
    if is_sharded(path):  # an fsdp/hsdp run's ckpt-N.dcp folder
        state = load_checkpoint(path)
        return state["ema"], "ldmkit", state["config"], folder_config
    if path.is_dir():
        if (path / "config.json").is_file():
            folder_config = json.loads((path / "config.json").read_text())
        files = [f for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) if f.name != LDMKIT_EXTRA]
        for sub in (path / "transformer", path / "unet"):  # a pipeline folder: its denoiser
            if not files and sub.is_dir():
                return read_weights(sub, trust_pickle)
        if not files:
            raise ConversionError(f"no weights (*.safetensors or *.bin) in folder {path}")
        path = files[0]
    if not path.is_file():
        raise ConversionError(f"weights not found: {path}")
    sd = load_file(path, trust_pickle=trust_pickle) if trust_pickle else load_checkpoint(path)
    if not isinstance(sd, dict):
        raise ConversionError(f"{path} holds a {type(sd).__name__}, not a state dict")
    if "config" in sd and "ema" in sd and "images_seen" in sd:
        return sd["ema"], "ldmkit", sd["config"], folder_config
    sd = unwrap_official(sd)
    found = detect_backbone(sd)
    if found is None:
        raise ConversionError(
            f"{path}: unrecognised weight layout; ldmkit reads ldmkit checkpoints, official DiT, MDT-v2 and SD3 / "
            "SD3.5 weights (with or without the model.diffusion_model. prefix), and diffusers DiT, PixArt-alpha, SD3 "
            "transformers and UNets"
        )
    return sd, found[1], None, folder_config
