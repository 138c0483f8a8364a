"""DiT's spec (see models/spec.py), and its weights in and out of ldmkit.

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

from ..conditioning.cond import Cond
from .dit import DIT_PRESETS, DIT_SIZES, DiT
from .spec import (
    BackboneSpec,
    ConversionError,
    block_count,
    cross_attention_flops,
    guided_channels_for,
    overrides_of,
    passes_tokens,
    probe_inputs,
    transformer_block_flops,
)


def dit_arch_from_state_dict(sd: dict, num_heads: int | None = None, input_size: int | None = None) -> dict:
    """Architecture of an ldmkit/official DiT state dict (heads as given, else those of the published size with this
    width and depth; the input size from pos_embed, else as given)."""
    try:
        w = sd["x_embedder.proj.weight"]
    except KeyError:
        raise ConversionError("not a DiT state dict: 'x_embedder.proj.weight' is missing") from None
    hidden, in_channels, patch = w.shape[0], w.shape[1], w.shape[2]
    depth = block_count(sd, "blocks.")
    if num_heads is None:  # not in the weights: only a published size (its width and depth) says it
        sizes = [s for s in DIT_SIZES.values() if (s["hidden_size"], s["depth"]) == (hidden, depth)]
        if not sizes:
            raise ConversionError(
                f"width {hidden} with {depth} blocks is no published DiT size, so its head count is unknown; give "
                "--num-heads"
            )
        num_heads = sizes[0]["num_heads"]
    if hidden % num_heads:
        raise ConversionError(f"{num_heads} heads do not divide the width {hidden}")
    out = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    tokens = sd["pos_embed"].shape[1] if "pos_embed" in sd else None
    return dict(
        hidden_size=hidden,
        in_channels=in_channels,
        patch_size=patch,
        depth=depth,
        num_heads=num_heads,
        num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,
        learn_sigma=out == 2 * in_channels,
        input_size=int(round(tokens**0.5)) * patch if tokens else input_size,
    )


def diffusers_to_ldmkit(sd: dict) -> dict:
    depth = block_count(sd, "transformer_blocks.")
    if depth == 0 or "pos_embed.proj.weight" not in sd:
        raise ConversionError(
            "not a diffusers DiTTransformer2DModel state dict (no transformer_blocks / pos_embed.proj)"
        )
    emb = "transformer_blocks.0.norm1.emb."
    out = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "t_embedder.mlp.0.weight": sd[emb + "timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": sd[emb + "timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": sd[emb + "timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": sd[emb + "timestep_embedder.linear_2.bias"],
        "y_embedder.embedding_table.weight": sd[emb + "class_embedder.embedding_table.weight"],
        "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
        "final_layer.linear.weight": sd["proj_out_2.weight"],
        "final_layer.linear.bias": sd["proj_out_2.bias"],
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
    depth = block_count(sd, "blocks.")
    out = {
        "pos_embed.proj.weight": sd["x_embedder.proj.weight"],
        "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
        "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": sd["final_layer.linear.weight"],
        "proj_out_2.bias": sd["final_layer.linear.bias"],
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
        num_attention_heads=arch["num_heads"],
        attention_head_dim=arch["hidden_size"] // arch["num_heads"],
        in_channels=arch["in_channels"],
        out_channels=arch["in_channels"] * (2 if arch["learn_sigma"] else 1),
        num_layers=arch["depth"],
        sample_size=arch["input_size"],
        patch_size=arch["patch_size"],
        num_embeds_ada_norm=arch["num_classes"],
        norm_eps=1e-6,
    )


def diffusers_dit(sd_ldmkit: dict, arch: dict):
    """A diffusers DiTTransformer2DModel holding these weights (every tensor placed: checked)."""
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(**diffusers_config(arch))
    missing, unexpected = model.load_state_dict(ldmkit_to_diffusers(sd_ldmkit), strict=False)
    real_missing = [k for k in missing if "pos_embed.pos_embed" not in k]
    if real_missing or unexpected:
        raise ConversionError(
            f"export does not fit DiTTransformer2DModel: missing {real_missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model.eval()


def write_diffusers(sd_ldmkit: dict, arch: dict, out_dir: str | Path, note: dict | None = None, model=None) -> Path:
    """Write a diffusers DiTTransformer2DModel folder (config.json + safetensors) and check it loads. model: the
    diffusers model of these weights when the caller has built it already."""
    out_dir = Path(out_dir)
    (model or diffusers_dit(sd_ldmkit, arch)).save_pretrained(out_dir)
    info = {"converted_by": "ldmkit", "arch": arch, **(note or {})}
    (out_dir / "ldmkit.json").write_text(json.dumps(info, indent=1))
    return out_dir


@torch.no_grad()
def dit_probe(model: DiT, reference) -> tuple[torch.Tensor, torch.Tensor]:
    """(ldmkit's output, diffusers') on the same random latents, noise levels and class labels."""
    x, t, g = probe_inputs(model)
    labels = torch.randint(0, max(model.y_embedder.num_classes, 1), (len(x),), generator=g)
    steps = (t * 1000).round()
    ours = model.eval()(x, steps / 1000, Cond(class_labels=labels))
    return ours, reference(x, timestep=steps, class_labels=labels).sample


def dit_overrides(
    sd: dict, layout: str, folder_config: dict, num_heads: int | None = None, timestep_freq_shift: float | None = None
) -> list[str]:
    """Config overrides for an official or diffusers DiT (sd already in ldmkit's names)."""
    arch = dit_arch_from_state_dict(
        sd, num_heads or folder_config.get("num_attention_heads"), folder_config.get("sample_size")
    )
    if arch["input_size"] is None:
        raise ConversionError("the input size is unknown (no pos_embed and no config.json with sample_size)")
    # diffusers' DiT embeds timesteps with freq shift 1, the official code with 0
    shift = timestep_freq_shift if timestep_freq_shift is not None else (1.0 if layout == "diffusers" else 0.0)
    overrides = overrides_of({**arch, "timestep_freq_shift": shift}) + [f"data.resolution={arch['input_size'] * 8}"]
    overrides += guided_channels_for(arch["in_channels"])
    if not arch["learn_sigma"]:
        overrides.append("sample.sampler=ddim")
    return overrides


def dit_to_diffusers(model: DiT) -> tuple[object, list[str]]:
    if model.conditioning != "class":
        raise ConversionError(
            "diffusers' DiTTransformer2DModel is DiT as published (class in adaLN); this DiT has no diffusers form"
        )
    sd = model.state_dict()
    notes = []
    shift = model.t_embedder.freq_shift
    if shift != 1:
        notes.append(
            f"diffusers' DiT embeds timesteps with freq shift 1, this model with {shift:g}; train with "
            "model.timestep_freq_shift=1 for a faithful diffusers model"
        )
    return diffusers_dit(sd, dit_arch_from_state_dict(sd, model.num_heads)), notes


def detect_dit(sd: dict) -> str | None:
    if "blocks.0.attn.qkv.weight" in sd and "x_embedder.proj.weight" in sd:
        return "official"
    if "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.weight" in sd:
        return "diffusers"
    return None


def dit_flops(model: DiT, tokens_per_caption: int) -> float:
    D, p = model.hidden_size, model.patch_size
    T = (model.input_size // p) ** 2
    L = 1 if model.conditioning == "class" else tokens_per_caption
    mlp_hidden = model.blocks[0].mlp.fc1.out_features
    per_block = transformer_block_flops(T, D, mlp_hidden) + 2 * D * 6 * D  # + adaLN
    if model.semantic_path == "attention":  # cross-attention to the class token or caption tokens
        per_block += cross_attention_flops(T, L, D)
    patch = 2 * T * model.in_channels * p * p * D
    final = 2 * T * D * p * p * model.out_channels + 2 * D * 2 * D
    time = 2 * (256 * D + D * D)
    cond = 2 * (model.text_embedder.in_dim * D + D * D) if model.conditioning == "pooled_text" else 0
    if model.conditioning == "text":
        cond = 2 * L * model.context_embedder.in_features * D
    return float(len(model.blocks) * per_block + patch + final + time + cond)


SPEC = BackboneSpec(
    name="dit",
    model_class=DiT,
    presets=DIT_PRESETS,
    conditionings=("class", "pooled_text", "text"),
    config_keys=(
        "num_classes",
        "timestep_freq_shift",
        "pooled_dim",
        "context_dim",
        "mlp_ratio",
        "pos_embed_base_size",
        "pos_embed_resample",
    ),
    published_class_path="adaln",
    blocks=lambda model: list(model.blocks),
    skip_block=passes_tokens,
    flops=dit_flops,
    recipe="imagenet256/dit_xl2.yaml",
    class_tables=("y_embedder.embedding_table.weight",),
    text_embedders=("context_embedder.", "text_embedder."),
    detect=detect_dit,
    import_weights=lambda sd, layout: diffusers_to_ldmkit(sd) if layout == "diffusers" else sd,
    import_overrides=dit_overrides,
    kept_on_import=("pos_embed",),
    to_diffusers=dit_to_diffusers,
    diffusers_probe=dit_probe,
    diffusers_pipeline=lambda model: "DiTPipeline",
)
