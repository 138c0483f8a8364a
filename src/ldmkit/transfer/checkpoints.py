"""Weights in and out of ldmkit's DiT, and reading weight files of every layout (the other backbones'
diffusers mappings are in transfer/pixart.py, mmdit.py and unet.py).

In: the official facebookresearch/DiT layout (`DiT-XL-2-256x256.pt`, or a DiT train.py checkpoint holding
`model`/`ema`), whose module names ldmkit's DiT shares; and the diffusers `DiTTransformer2DModel` layout
(a folder with config.json + weights, or a state dict). Out: the diffusers layout, loadable with
`DiTTransformer2DModel.from_pretrained`.

Two numerical differences exist between diffusers' DiT and the official one, and both are carried as
settings rather than hidden: diffusers' timestep features divide by (half - 1) where the official code
divides by half (`model.timestep_freq_shift` 1 vs 0), and its feed-forward LayerNorm eps defaults to 1e-5
(export writes the official 1e-6).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint, load_file
from ..models.dit import DIT_SIZES


class ConversionError(ValueError):
    """Weights that cannot be converted, reported as one line."""


def copy_renamed(sd: dict, renames: dict[str, str], out: dict, reverse: bool = False) -> dict:
    """out[new + '.weight' / '.bias'] = sd[old + ...] for each old -> new of renames (new -> old when
    reverse); modules absent from sd (an optional embedder) are skipped."""
    for a, b in renames.items():
        src, dst = (b, a) if reverse else (a, b)
        for part in ("weight", "bias"):
            if f"{src}.{part}" in sd:
                out[f"{dst}.{part}"] = sd[f"{src}.{part}"]
    return out


def _block_count(sd: dict, prefix: str) -> int:
    ids = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def dit_arch_from_state_dict(sd: dict, num_heads: int | None = None, input_size: int | None = None) -> dict:
    """Architecture of an ldmkit/official DiT state dict (heads from the size table unless given; the
    input size from pos_embed, else as given)."""
    try:
        w = sd["x_embedder.proj.weight"]
    except KeyError:
        raise ConversionError("not a DiT state dict: 'x_embedder.proj.weight' is missing") from None
    hidden, in_channels, patch = w.shape[0], w.shape[1], w.shape[2]
    depth = _block_count(sd, "blocks.")
    if num_heads is None:
        sizes = [s for s in DIT_SIZES.values() if s["hidden_size"] == hidden]
        if not sizes:
            raise ConversionError(f"width {hidden} matches no DiT size; give the number of heads")
        num_heads = sizes[0]["num_heads"]
    out = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    tokens = sd["pos_embed"].shape[1] if "pos_embed" in sd else None
    return dict(
        hidden_size=hidden, in_channels=in_channels, patch_size=patch, depth=depth, num_heads=num_heads,
        num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1, learn_sigma=out == 2 * in_channels,
        input_size=int(round(tokens**0.5)) * patch if tokens else input_size,
    )


def unwrap_official(obj) -> dict:
    """An official checkpoint is a bare state dict; a DiT train.py checkpoint nests it (EMA preferred)."""
    if isinstance(obj, dict) and "ema" in obj and isinstance(obj["ema"], dict):
        return obj["ema"]
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj["model"]
    return obj


def diffusers_to_ldmkit(sd: dict) -> dict:
    depth = _block_count(sd, "transformer_blocks.")
    if depth == 0 or "pos_embed.proj.weight" not in sd:
        raise ConversionError("not a diffusers DiTTransformer2DModel state dict (no transformer_blocks / pos_embed.proj)")
    emb = "transformer_blocks.0.norm1.emb."
    out = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"], "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "t_embedder.mlp.0.weight": sd[emb + "timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": sd[emb + "timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": sd[emb + "timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": sd[emb + "timestep_embedder.linear_2.bias"],
        "y_embedder.embedding_table.weight": sd[emb + "class_embedder.embedding_table.weight"],
        "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"], "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
        "final_layer.linear.weight": sd["proj_out_2.weight"], "final_layer.linear.bias": sd["proj_out_2.bias"],
    }
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        # diffusers keeps one copy of the embedders per block; ldmkit (like the official DiT) shares one.
        for name in ("timestep_embedder.linear_1.weight", "class_embedder.embedding_table.weight"):
            if not torch.equal(sd[src + "norm1.emb." + name], sd[emb + name]):
                raise ConversionError(f"block {i} has its own '{name}'; ldmkit's DiT shares one embedder across blocks")
        for part in ("weight", "bias"):
            out[dst + f"adaLN_modulation.1.{part}"] = sd[src + f"norm1.linear.{part}"]
            out[dst + f"attn.qkv.{part}"] = torch.cat([sd[src + f"attn1.to_{n}.{part}"] for n in "qkv"])
            out[dst + f"attn.proj.{part}"] = sd[src + f"attn1.to_out.0.{part}"]
            out[dst + f"mlp.fc1.{part}"] = sd[src + f"ff.net.0.proj.{part}"]
            out[dst + f"mlp.fc2.{part}"] = sd[src + f"ff.net.2.{part}"]
    return out


def ldmkit_to_diffusers(sd: dict) -> dict:
    depth = _block_count(sd, "blocks.")
    out = {
        "pos_embed.proj.weight": sd["x_embedder.proj.weight"], "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
        "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"], "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": sd["final_layer.linear.weight"], "proj_out_2.bias": sd["final_layer.linear.bias"],
    }
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = dst + "norm1.emb."
        out[emb + "timestep_embedder.linear_1.weight"] = sd["t_embedder.mlp.0.weight"]
        out[emb + "timestep_embedder.linear_1.bias"] = sd["t_embedder.mlp.0.bias"]
        out[emb + "timestep_embedder.linear_2.weight"] = sd["t_embedder.mlp.2.weight"]
        out[emb + "timestep_embedder.linear_2.bias"] = sd["t_embedder.mlp.2.bias"]
        out[emb + "class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
        for part in ("weight", "bias"):
            out[dst + f"norm1.linear.{part}"] = sd[src + f"adaLN_modulation.1.{part}"]
            q, k, v = sd[src + f"attn.qkv.{part}"].chunk(3)
            out[dst + f"attn1.to_q.{part}"], out[dst + f"attn1.to_k.{part}"], out[dst + f"attn1.to_v.{part}"] = q, k, v
            out[dst + f"attn1.to_out.0.{part}"] = sd[src + f"attn.proj.{part}"]
            out[dst + f"ff.net.0.proj.{part}"] = sd[src + f"mlp.fc1.{part}"]
            out[dst + f"ff.net.2.{part}"] = sd[src + f"mlp.fc2.{part}"]
    return {k: v.contiguous() for k, v in out.items()}


def diffusers_config(arch: dict) -> dict:
    return dict(
        num_attention_heads=arch["num_heads"], attention_head_dim=arch["hidden_size"] // arch["num_heads"],
        in_channels=arch["in_channels"], out_channels=arch["in_channels"] * (2 if arch["learn_sigma"] else 1),
        num_layers=arch["depth"], sample_size=arch["input_size"], patch_size=arch["patch_size"],
        num_embeds_ada_norm=arch["num_classes"], norm_eps=1e-6,
    )


def read_weights(path: str | Path, trust_pickle: bool = False) -> tuple[dict, str, dict | None, dict]:
    """Load weights from a file or folder; returns (state dict, layout, embedded ldmkit config or None,
    the diffusers config.json beside the weights or {}). Files are read without running code (safetensors or
    weights_only; see ldmkit.checkpoint.load_file), unless trust_pickle.
    Layouts: 'ldmkit' (an ldmkit checkpoint), 'official' (facebookresearch/DiT), 'diffusers'."""
    path = Path(path)
    folder_config = {}
    if path.is_dir():
        if (path / "config.json").is_file():
            folder_config = json.loads((path / "config.json").read_text())
        files = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
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
    if isinstance(sd, dict) and "config" in sd and "ema" in sd and "images_seen" in sd:
        return sd["ema"], "ldmkit", sd["config"], folder_config
    sd = unwrap_official(sd)
    if any(k.startswith("transformer_blocks.") for k in sd) or "time_embedding.linear_1.weight" in sd:
        return sd, "diffusers", None, folder_config
    if "x_embedder.proj.weight" in sd:
        return sd, "official", None, folder_config
    raise ConversionError(f"{path}: unrecognised weight layout (not an ldmkit checkpoint, an official DiT, or a diffusers "
                          "DiT / PixArt / SD3 transformer or UNet)")


def write_diffusers(sd_ldmkit: dict, arch: dict, out_dir: str | Path) -> Path:
    """Write a diffusers DiTTransformer2DModel folder (config.json + safetensors) and check it loads."""
    from diffusers import DiTTransformer2DModel

    out_dir = Path(out_dir)
    model = DiTTransformer2DModel(**diffusers_config(arch))
    missing, unexpected = model.load_state_dict(ldmkit_to_diffusers(sd_ldmkit), strict=False)
    real_missing = [k for k in missing if "pos_embed.pos_embed" not in k]
    if real_missing or unexpected:
        raise ConversionError(f"export does not fit DiTTransformer2DModel: missing {real_missing[:3]}, unexpected {unexpected[:3]}")
    model.save_pretrained(out_dir)
    (out_dir / "ldmkit.json").write_text(json.dumps({"converted_by": "ldmkit", "arch": arch,
                                                     "note": "diffusers' DiT uses timestep freq shift 1; ldmkit-trained models used 0"}, indent=1))
    return out_dir
