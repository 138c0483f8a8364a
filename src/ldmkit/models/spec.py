"""What the rest of ldmkit knows about a backbone, in one object per backbone (models/<name>_spec.py).

The trainer, the parallel wrappers, transfer and the CLI read a backbone only through its spec: how to build
it, which blocks repeat (what compile, activation checkpointing and FSDP wrap), its FLOPs, where the semantic
condition may enter, its weight mappings to and from other layouts, and any extra training pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn


class ConversionError(ValueError):
    """Weights that cannot be converted, reported as one line."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str  # model.name
    model_class: type[nn.Module]
    presets: dict[str, dict]  # preset name -> architecture keyword arguments
    conditionings: tuple[str, ...]  # model.conditioning values it takes
    config_keys: tuple[str, ...]  # model.* keys its constructor reads beyond the common ones
    published_class_path: str  # where its paper puts a class label: adaln | attention
    blocks: Callable[[nn.Module], list[nn.Module]]  # the repeated blocks, in forward order
    flops: Callable[[nn.Module, int], float]  # (model, tokens per caption) -> forward FLOPs per image
    recipe: str  # shipped config that imported foreign weights start from
    # Constructor arguments from the model config: (model_cfg, keyword arguments so far) -> keyword arguments.
    build_kwargs: Callable[[object, dict], dict] = lambda model_cfg, kwargs: kwargs
    attends_class: bool = True  # False: no attention to a class token (no semantic_path argument)
    pooled_text_with_tokens: bool = False  # text also sums a pooled caption into adaLN (SD3's mmDiT)
    fixed_pos_table: str | None = None  # why model.pos_embed_* do not apply, or None when they do
    # Tensor names by role, for init transfer: class tables (remapped by WordNet id), text embedders.
    class_tables: tuple[str, ...] = ()
    text_embedders: tuple[str, ...] = ()
    # Foreign weights: detect(state dict) -> layout name ('official' | 'diffusers') or None when not this
    # backbone's; import_weights(sd, layout) -> the state dict in ldmkit's names; import_overrides(ldmkit state
    # dict, layout, the diffusers config.json or {}, **options) -> config overrides that describe the model.
    detect: Callable[[dict], str | None] = lambda sd: None
    import_weights: Callable[[dict, str], dict] = lambda sd, layout: sd
    import_overrides: Callable[..., list[str]] | None = None
    # Tensors that a foreign layout does not carry and that the new model keeps from its own init.
    kept_on_import: tuple[str, ...] = ()
    # Its diffusers form: to_diffusers(model) -> (the diffusers model holding its weights, notes on what differs
    # in diffusers); diffusers_probe(model, that diffusers model) -> (ldmkit's output, diffusers') on the same
    # random inputs; the diffusers pipeline class that runs it and the pipeline's folder for it.
    to_diffusers: Callable[[nn.Module], tuple[nn.Module, list[str]]] | None = None
    no_export: str = "no diffusers form"  # why, when to_diffusers is None
    diffusers_probe: Callable[[nn.Module, nn.Module], tuple[torch.Tensor, torch.Tensor]] | None = None
    diffusers_pipeline: Callable[[nn.Module], str] = lambda model: ""
    diffusers_folder: str = "transformer"
    # What a skipped block returns, from its call's arguments (skip-layer guidance runs the model without some
    # blocks); None: its blocks cannot be skipped.
    skip_block: Callable[..., object] | None = None
    # Extra training pass (MDT-v2's masked pass): model -> ExtraPass or None.
    extra_pass: Callable[[nn.Module], "ExtraPass | None"] = lambda model: None


def passes_tokens(x, *args, **kwargs):
    """skip_block of a block that maps tokens x (its first argument) to tokens."""
    return x


class ExtraPass:
    """A second forward of the same noisy latents with extra model arguments; its losses add to the main
    ones. draw() takes the step's randomness for the whole global batch; kwargs() slices it per micro-batch."""

    def draw(self, batch: int, generator: torch.Generator, device) -> torch.Tensor:
        raise NotImplementedError

    def kwargs(self, drawn: torch.Tensor, part: slice) -> dict:
        raise NotImplementedError


def probe_inputs(model: nn.Module, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """Fixed random latents [batch, C, S, S] for the model's input size, noise levels t in [0, 1] and the generator
    that draws the rest of a probe's inputs (the diffusers probes compare two models on them)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g)
    return x, torch.linspace(0.1, 0.8, batch), g


def copy_renamed(sd: dict, renames: dict[str, str], out: dict, reverse: bool = False) -> dict:
    """out[new + '.weight' / '.bias'] = sd[old + ...] for each old -> new of renames (new -> old when
    reverse); modules absent from sd (an optional embedder) are skipped."""
    for a, b in renames.items():
        src, dst = (b, a) if reverse else (a, b)
        for part in ("weight", "bias"):
            if f"{src}.{part}" in sd:
                out[f"{dst}.{part}"] = sd[f"{src}.{part}"]
    return out


def block_count(sd: dict, prefix: str) -> int:
    """How many numbered blocks `prefix<i>.` a state dict holds."""
    ids = {int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix)}
    return max(ids) + 1 if ids else 0


def guided_channels_for(in_channels: int) -> list[str]:
    """DiT's and MDT-v2's recipes guide 3 of their 4 latent channels (their sampling code's quirk); weights with
    another latent layout are guided on all channels."""
    return [] if in_channels == 4 else ["sample.guided_channels=null"]


def overrides_of(arch: dict) -> list[str]:
    """`model.key=value` overrides (YAML spelling of booleans) of an architecture dict."""
    return [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in arch.items()]


def transformer_block_flops(T: int, D: int, mlp_hidden: int) -> float:
    """A self-attention block on T tokens of width D: qkv + output projection, scores and values, MLP."""
    return 2 * T * (3 * D * D + D * D + 2 * D * mlp_hidden) + 2 * 2 * T * T * D


def cross_attention_flops(T: int, L: int, D: int) -> float:
    """Cross-attention of T tokens to L context tokens of width D: q, kv, output projection, attention."""
    return 2 * T * D * D + 2 * L * 2 * D * D + 2 * T * D * D + 2 * 2 * T * L * D
