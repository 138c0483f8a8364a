"""mmDiT's spec (see models/spec.py), and its weights between ldmkit, the official SD3 / SD3.5 checkpoints and
diffusers' `SD3Transformer2DModel`.

ldmkit's module names are the official ones, so an official file (sd3_medium.safetensors, sd3.5_large.safetensors,
sd3.5_medium.safetensors with its MMDiT-X blocks; with or without the `model.diffusion_model.` prefix of the
all-in-one files) loads as it is. diffusers stores the two-way modulations of the pre-only context block and of
the final layer as (scale, shift); the official layout, and ldmkit, as (shift, scale): those halves are swapped.
"""

from __future__ import annotations

import torch

from ..conditioning.cond import Cond
from .mmdit import MMDIT_PRESETS, MMDiT
from .spec import BackboneSpec, ConversionError, block_count, copy_renamed, overrides_of, probe_inputs

_RENAMES = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.linear": "proj_out",
}
_STREAMS = {  # ldmkit stream -> diffusers names: (adaLN, q, k, v, out, norm q, norm k, mlp)
    "x_block": (
        "norm1.linear",
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.norm_q",
        "attn.norm_k",
        "ff",
    ),
    "context_block": (
        "norm1_context.linear",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
        "attn.norm_added_q",
        "attn.norm_added_k",
        "ff_context",
    ),
}


_DUAL = {"proj": "to_out.0", "ln_q": "norm_q", "ln_k": "norm_k"}  # MMDiT-X's attn2, beside its qkv


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def mmdit_to_diffusers(sd: dict) -> dict:
    out = copy_renamed(sd, _RENAMES, {"pos_embed.pos_embed": sd["pos_embed"]})
    for part in ("weight", "bias"):
        out[f"norm_out.linear.{part}"] = _swap_halves(sd[f"final_layer.adaLN_modulation.1.{part}"])
    depth = block_count(sd, "joint_blocks.")
    for i in range(depth):
        for stream, (ada, q, k, v, proj, nq, nk, ff) in _STREAMS.items():
            src, dst = f"joint_blocks.{i}.{stream}.", f"transformer_blocks.{i}."
            pre_only = f"{src}attn.proj.weight" not in sd
            for part in ("weight", "bias"):
                mod = sd[f"{src}adaLN_modulation.1.{part}"]
                out[f"{dst}{ada}.{part}"] = _swap_halves(mod) if pre_only else mod
                out[f"{dst}{q}.{part}"], out[f"{dst}{k}.{part}"], out[f"{dst}{v}.{part}"] = sd[
                    f"{src}attn.qkv.{part}"
                ].chunk(3)
                if not pre_only:
                    out[f"{dst}{proj}.{part}"] = sd[f"{src}attn.proj.{part}"]
                    out[f"{dst}{ff}.net.0.proj.{part}"] = sd[f"{src}mlp.fc1.{part}"]
                    out[f"{dst}{ff}.net.2.{part}"] = sd[f"{src}mlp.fc2.{part}"]
            if f"{src}attn.ln_q.weight" in sd:
                out[f"{dst}{nq}.weight"], out[f"{dst}{nk}.weight"] = (
                    sd[f"{src}attn.ln_q.weight"],
                    sd[f"{src}attn.ln_k.weight"],
                )
        if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in sd:  # MMDiT-X: the image stream's own attention
            src, dst = f"joint_blocks.{i}.x_block.attn2.", f"transformer_blocks.{i}.attn2."
            copy_renamed(sd, {f"{src}{a}": f"{dst}{b}" for a, b in _DUAL.items()}, out)
            for part in ("weight", "bias"):
                out[f"{dst}to_q.{part}"], out[f"{dst}to_k.{part}"], out[f"{dst}to_v.{part}"] = sd[
                    f"{src}qkv.{part}"
                ].chunk(3)
    return {k: v.contiguous() for k, v in out.items()}


def mmdit_from_diffusers(sd: dict) -> dict:
    if "time_text_embed.timestep_embedder.linear_1.weight" not in sd or "context_embedder.weight" not in sd:
        raise ConversionError(
            "not a diffusers SD3Transformer2DModel state dict (no time_text_embed / context_embedder)"
        )
    out = copy_renamed(sd, _RENAMES, {"pos_embed": sd["pos_embed.pos_embed"]}, reverse=True)
    for part in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{part}"] = _swap_halves(sd[f"norm_out.linear.{part}"])
    for i in range(block_count(sd, "transformer_blocks.")):
        for stream, (ada, q, k, v, proj, nq, nk, ff) in _STREAMS.items():
            src, dst = f"transformer_blocks.{i}.", f"joint_blocks.{i}.{stream}."
            pre_only = f"{src}{proj}.weight" not in sd
            for part in ("weight", "bias"):
                mod = sd[f"{src}{ada}.{part}"]
                out[f"{dst}adaLN_modulation.1.{part}"] = _swap_halves(mod) if pre_only else mod
                out[f"{dst}attn.qkv.{part}"] = torch.cat([sd[f"{src}{n}.{part}"] for n in (q, k, v)])
                if not pre_only:
                    out[f"{dst}attn.proj.{part}"] = sd[f"{src}{proj}.{part}"]
                    out[f"{dst}mlp.fc1.{part}"] = sd[f"{src}{ff}.net.0.proj.{part}"]
                    out[f"{dst}mlp.fc2.{part}"] = sd[f"{src}{ff}.net.2.{part}"]
            if f"{src}{nq}.weight" in sd:
                out[f"{dst}attn.ln_q.weight"], out[f"{dst}attn.ln_k.weight"] = (
                    sd[f"{src}{nq}.weight"],
                    sd[f"{src}{nk}.weight"],
                )
        if f"transformer_blocks.{i}.attn2.to_q.weight" in sd:  # MMDiT-X
            src, dst = f"transformer_blocks.{i}.attn2.", f"joint_blocks.{i}.x_block.attn2."
            copy_renamed(sd, {f"{dst}{a}": f"{src}{b}" for a, b in _DUAL.items()}, out, reverse=True)
            for part in ("weight", "bias"):
                out[f"{dst}qkv.{part}"] = torch.cat([sd[f"{src}to_{n}.{part}"] for n in "qkv"])
    return out


def is_diffusers_mmdit(sd: dict) -> bool:
    return "time_text_embed.timestep_embedder.linear_1.weight" in sd and "context_embedder.weight" in sd


def mmdit_diffusers_config(model) -> dict:
    """The SD3Transformer2DModel config of a text-conditional ldmkit mmDiT."""
    return dict(
        sample_size=model.input_size,
        patch_size=model.patch_size,
        in_channels=model.in_channels,
        out_channels=model.out_channels,
        num_layers=len(model.joint_blocks),
        attention_head_dim=model.hidden_size // model.num_heads,
        num_attention_heads=model.num_heads,
        joint_attention_dim=model.context_embedder.in_features,
        caption_projection_dim=model.hidden_size,
        pooled_projection_dim=model.y_embedder.mlp[0].in_features,
        pos_embed_max_size=model.pos_embed_max_size,
        qk_norm="rms_norm" if isinstance(model.joint_blocks[0].x_block.attn.ln_q, torch.nn.RMSNorm) else None,
        dual_attention_layers=model.dual_attention_layers,
    )


def mmdit_overrides(config: dict) -> list[str]:
    """ldmkit config overrides describing the SD3Transformer2DModel of a diffusers config.json."""
    if not config:
        raise ConversionError("a diffusers SD3 folder needs its config.json (heads, sample size) to be converted")
    heads, head_dim = config.get("num_attention_heads", 18), config.get("attention_head_dim", 64)
    in_channels = config.get("in_channels", 16)
    out_channels = config.get("out_channels") or in_channels
    size, patch = config.get("sample_size", 128), config.get("patch_size", 2)
    arch = dict(
        input_size=size,
        in_channels=in_channels,
        learn_sigma=out_channels == 2 * in_channels,
        depth=config.get("num_layers", 18),
        hidden_size=heads * head_dim,
        num_heads=heads,
        patch_size=patch,
        context_dim=config.get("joint_attention_dim", 4096),
        pooled_dim=config.get("pooled_projection_dim", 2048),
        qk_norm=config.get("qk_norm") == "rms_norm",
        pos_embed_max_size=config.get("pos_embed_max_size") or size // patch,
        dual_attention_layers=list(config.get("dual_attention_layers") or []),
    )
    return sd3_overrides(arch)


def sd3_overrides(arch: dict) -> list[str]:
    """The config overrides of an SD3-family mmDiT architecture: the model keys, the resolution its latents have
    (an 8x VAE) and sd3_sampling."""
    resolution = [f"data.resolution={arch['input_size'] * 8}"]
    return (
        overrides_of(arch)
        + resolution
        + sd3_sampling(arch["in_channels"], bool(arch["dual_attention_layers"]), arch["qk_norm"])
    )


def sd3_sampling(in_channels: int, dual: bool, qk_norm: bool) -> list[str]:
    """The published sampling of SD3-family weights (Stability-AI/sd3.5 sd3_infer.py: shift 3 as its released
    models, dpmpp_2m on SD3's sigma table; SD3.5-medium 50 steps at scale 5, SD3.5-large 40 at 4.5, SD3-medium 50 at
    5), and SD3's 16-channel VAE (gated on the hub: accept its license, or point autoencoder.path at a copy)."""
    steps, scale = (40, 4.5) if qk_norm and not dual else (50, 5.0)
    out = [
        "diffusion.time_shift=3.0",
        "sample.sampler=dpmpp",
        "sample.solver_order=2",
        "sample.sigma_schedule=sd3",
        f"sample.steps={steps}",
        f"sample.guidance_scale={scale}",
    ]
    if in_channels == 16:
        vae = "stabilityai/stable-diffusion-3-medium-diffusers"
        out += ["autoencoder.layout=sd3", f"autoencoder.path={vae}", "autoencoder.subfolder=vae"]
    return out


def official_overrides(sd: dict, num_heads: int | None = None) -> list[str]:
    """ldmkit config overrides describing official SD3 / SD3.5 weights. The official code derives the heads from
    the width (64 per head, as many heads as blocks); with QK norm the head width is in the weights."""
    w = sd["x_embedder.proj.weight"]
    hidden, in_channels, patch = w.shape[0], w.shape[1], w.shape[2]
    depth = block_count(sd, "joint_blocks.")
    qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in sd
    if num_heads is None:
        if qk_norm:
            num_heads = hidden // sd["joint_blocks.0.x_block.attn.ln_q.weight"].shape[0]
        elif hidden == 64 * depth:
            num_heads = depth
        else:
            raise ConversionError(
                f"the head count of this mmDiT (width {hidden}, {depth} blocks) is not in its weights; give --num-heads"
            )
    if hidden % num_heads:
        raise ConversionError(f"--num-heads {num_heads} does not divide the width {hidden}")
    out_channels = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    dual = sorted(i for i in range(depth) if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in sd)
    grid = int(round(sd["pos_embed"].shape[1] ** 0.5))
    size = min(128, grid * patch)  # SD3's sample size (1024 px), within the positional table
    arch = dict(
        input_size=size,
        in_channels=in_channels,
        learn_sigma=out_channels == 2 * in_channels,
        depth=depth,
        hidden_size=hidden,
        num_heads=num_heads,
        patch_size=patch,
        context_dim=sd["context_embedder.weight"].shape[1],
        pooled_dim=sd["y_embedder.mlp.0.weight"].shape[1],
        qk_norm=qk_norm,
        pos_embed_max_size=grid,
        dual_attention_layers=dual,
    )
    return sd3_overrides(arch)


def detect_mmdit(sd: dict) -> str | None:
    if "joint_blocks.0.x_block.attn.qkv.weight" in sd and "x_embedder.proj.weight" in sd:
        return "official"
    return "diffusers" if is_diffusers_mmdit(sd) else None


def mmdit_to_diffusers_model(model) -> tuple[object, list[str]]:
    from diffusers import SD3Transformer2DModel

    if model.conditioning != "text":
        raise ConversionError(
            "diffusers' SD3Transformer2DModel is text-conditional; a class-conditional mmDiT has no diffusers form"
        )
    ref = SD3Transformer2DModel(**mmdit_diffusers_config(model))
    missing, unexpected = ref.load_state_dict(mmdit_to_diffusers(model.state_dict()), strict=False)
    if missing or unexpected:
        raise ConversionError(
            f"export does not fit SD3Transformer2DModel: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return ref.eval(), []


@torch.no_grad()
def mmdit_probe(model, reference) -> tuple[torch.Tensor, torch.Tensor]:
    """(ldmkit's output, diffusers') on the same latents, noise levels, caption tokens and pooled captions."""
    x, t, g = probe_inputs(model)
    context = torch.randn(len(x), 8, reference.config.joint_attention_dim, generator=g)
    pooled = torch.randn(len(x), reference.config.pooled_projection_dim, generator=g)
    ours = model.eval()(x, t, Cond(context=context, pooled=pooled))
    theirs = reference(x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t * 1000).sample
    return ours, theirs


def mmdit_flops(model: MMDiT, L: int) -> float:
    D, p = model.hidden_size, model.patch_size
    T = (model.input_size // p) ** 2
    mlp_hidden = model.joint_blocks[0].x_block.mlp.fc1.out_features
    if model.conditioning == "class":
        L, embed = 1, 0
    else:
        embed = 2 * L * model.context_embedder.in_features * D
        if model.semantic_path == "adaln":  # the pooled text MLP
            embed += 2 * (model.y_embedder.mlp[0].in_features * D + D * D)
    depth = len(model.joint_blocks)
    N = T + L
    stream = lambda n: 2 * n * (3 * D * D + D * D + 2 * D * mlp_hidden) + 2 * D * 6 * D  # qkv, proj, MLP, adaLN
    per_block = stream(T) + stream(L) + 2 * 2 * N * N * D  # both streams, joint attention
    # MMDiT-X blocks: the image stream's own attention (qkv, projection, scores and values) and 3 more modulations
    dual = len(model.dual_attention_layers) * (2 * T * 4 * D * D + 2 * 2 * T * T * D + 2 * D * 3 * D)
    # the last context block is pre-only: qkv and a 2-way modulation only
    pre_only_saving = 2 * L * (D * D + 2 * D * mlp_hidden) + 2 * D * 4 * D
    patch = 2 * T * model.in_channels * p * p * D
    final = 2 * T * D * p * p * model.out_channels + 2 * D * 2 * D
    time = 2 * (256 * D + D * D)
    return float(depth * per_block + dual - pre_only_saving + patch + final + time + embed)


SPEC = BackboneSpec(
    name="mmdit",
    model_class=MMDiT,
    presets=MMDIT_PRESETS,
    conditionings=("class", "text"),
    config_keys=(
        "num_classes",
        "context_dim",
        "pooled_dim",
        "qk_norm",
        "pos_embed_max_size",
        "mlp_ratio",
        "pos_embed_base_size",
        "pos_embed_resample",
        "dual_attention_layers",
    ),
    published_class_path="attention",
    pooled_text_with_tokens=True,
    blocks=lambda model: list(model.joint_blocks),
    skip_block=lambda context, x, c: (context, x),  # a joint block maps (context, x) to both
    flops=mmdit_flops,
    recipe="cc12m256/mmdit_xl2.yaml",
    class_tables=("class_embedder.embedding_table.weight",),
    text_embedders=("context_embedder.", "y_embedder.mlp.0.", "y_embedder.mlp.2."),
    detect=detect_mmdit,
    import_weights=lambda sd, layout: mmdit_from_diffusers(sd) if layout == "diffusers" else sd,
    import_overrides=lambda sd, layout, folder_config, num_heads=None, **_: (
        official_overrides(sd, num_heads) if layout == "official" else mmdit_overrides(folder_config)
    ),
    kept_on_import=("pos_embed",),
    to_diffusers=mmdit_to_diffusers_model,
    diffusers_probe=mmdit_probe,
    diffusers_pipeline=lambda model: "StableDiffusion3Pipeline",
)
