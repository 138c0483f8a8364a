"""An ldmkit model as a complete diffusers pipeline folder (what `ldmkit export` and `Pipeline.save_pretrained`
write): the denoiser (transformer/ or unet/), the scheduler of the run's objective and sampler, the VAE when the
run has one, model_index.json, a model card (README.md) and the run's config (ldmkit_config.yaml), so that
`DiffusionPipeline.from_pretrained(folder)` and `ldmkit.load(folder)` both run it.

What is measured, not assumed, and written into the card: the gap between the diffusers denoiser and ldmkit's on
a probe input, and the gap between the diffusers scheduler's chain and ldmkit's sampler on a toy denoiser.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import yaml

from ..autoencoders import build_autoencoder
from ..config import RunConfig, build
from ..diffusion.objectives import build_objective
from ..diffusion.samplers import noise_levels, sample_ddpm, sample_dpmpp, sample_flow
from ..diffusion.schedules import flow_shift
from ..models.registry import count_parameters
from ..models.spec import BackboneSpec, ConversionError
from .convert import LDMKIT_CONFIG, check_exportable, describe_export


@dataclass(frozen=True)
class PipelineParts:
    """What a diffusers pipeline class needs beyond the denoiser, VAE and scheduler."""

    text: tuple[str, ...] = ()  # its text encoders and tokenizers: left empty, the card says how to give embeddings
    passes_variance: bool = False  # it hands a learned-variance model's extra channels to the scheduler
    applies_shift: bool = False  # it decodes with the VAE's shift_factor (SD3's latents)
    extra: tuple[tuple[str, object], ...] = ()  # constructor arguments
    call: str = ""  # the keyword arguments of a call, for the card


PIPELINES = {
    "DiTPipeline": PipelineParts(call="class_labels=[0, 1]"),
    "PixArtAlphaPipeline": PipelineParts(
        text=("tokenizer", "text_encoder"),
        call="prompt_embeds=text.tokens, prompt_attention_mask=text.mask.long(), negative_prompt=None, "
        "negative_prompt_embeds=null.tokens, negative_prompt_attention_mask=null.mask.long()",
    ),
    "StableDiffusion3Pipeline": PipelineParts(
        text=("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"),
        applies_shift=True,
        call="prompt_embeds=text.tokens, pooled_prompt_embeds=text.pooled, "
        "negative_prompt_embeds=null.tokens, negative_pooled_prompt_embeds=null.pooled",
    ),
    "StableDiffusionPipeline": PipelineParts(
        text=("text_encoder", "tokenizer", "safety_checker", "feature_extractor"),
        passes_variance=True,
        extra=(("requires_safety_checker", False),),
        call="prompt_embeds=text.tokens, negative_prompt_embeds=null.tokens",
    ),
    "StableDiffusionXLPipeline": PipelineParts(
        text=("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
        passes_variance=True,
        extra=(("add_watermarker", False),),
        call="prompt_embeds=text.tokens, pooled_prompt_embeds=text.pooled, "
        "negative_prompt_embeds=null.tokens, negative_pooled_prompt_embeds=null.pooled",
    ),
}
RESPACING_TO_DIFFUSERS = {"adm": "linspace", "linspace": "linspace", "leading": "leading", "trailing": "trailing"}


def diffusers_scheduler(cfg: RunConfig, passes_variance: bool):
    """The diffusers scheduler of the run's objective and sampler, and notes on where it differs from ldmkit's."""
    import diffusers

    s = cfg.sample
    if cfg.diffusion.objective == "flow":
        if s.sampler == "dpmpp" and s.sigma_schedule == "sd3":
            note = (
                "ldmkit samples with k-diffusion's DPM-Solver++(2M) on SD3's sigma table (SD3.5's reference sampler), "
                "which diffusers has no scheduler for: the pipeline runs FlowMatchEulerDiscreteScheduler on the same "
                "noise levels"
            )
            return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=flow_shift(cfg)), [note]
        if s.sampler == "dpmpp":
            flow = dict(use_flow_sigmas=True, flow_shift=flow_shift(cfg), prediction_type="flow_prediction")
            note = (
                "diffusers' DPM-Solver visits ldmkit's noise levels but hands the model whole timesteps "
                "(int(1000 sigma)) where ldmkit gives sigma itself"
            )
            return diffusers.DPMSolverMultistepScheduler(solver_order=s.solver_order, **flow), [note]
        heun = s.sampler == "heun"
        cls = diffusers.FlowMatchHeunDiscreteScheduler if heun else diffusers.FlowMatchEulerDiscreteScheduler
        return cls(num_train_timesteps=1000, shift=flow_shift(cfg)), []
    learned = cfg.model.learn_sigma
    if learned and passes_variance and s.sampler in ("ddim", "dpmpp"):
        raise ConversionError(
            f"this pipeline hands the learned variance to its scheduler, which {s.sampler} cannot take in diffusers; "
            "export with --set sample.sampler=ddpm"
        )
    common = dict(
        num_train_timesteps=cfg.diffusion.num_timesteps,
        trained_betas=build_objective(cfg).schedule.betas.tolist(),  # exact, shifted for the resolution if so
        clip_sample=False,
        prediction_type="epsilon",
        timestep_spacing=RESPACING_TO_DIFFUSERS[s.respacing],
        steps_offset=0,
    )
    if s.sampler == "ddim":
        return diffusers.DDIMScheduler(**common, set_alpha_to_one=True), []
    if s.sampler == "dpmpp":
        dpm = {k: v for k, v in common.items() if k != "clip_sample"}  # DPM-Solver++ never clips
        return diffusers.DPMSolverMultistepScheduler(
            **dpm, solver_order=s.solver_order, algorithm_type="dpmsolver++"
        ), []
    notes = []
    variance = "fixed_large"
    if learned:
        variance = "learned_range" if passes_variance else "fixed_small"
        if not passes_variance:
            notes.append(
                "this pipeline drops the learned variance channels: its DDPM scheduler samples with the fixed "
                "posterior variance (fixed_small) where ldmkit uses the learned one"
            )
    return diffusers.DDPMScheduler(**common, variance_type=variance), notes


@torch.no_grad()
def sampler_gap(cfg: RunConfig, scheduler, passes_variance: bool, sigmas: list[float] | None = None) -> float | None:
    """max |ldmkit's sampler - the diffusers scheduler's chain| at the configured steps, from the same noise through
    the same toy denoiser (eps or v = x (0.3 + 0.5 t)); None for the stochastic DDPM sampler. sigmas: the
    unshifted noise levels handed to a flow scheduler's set_timesteps."""
    sampler, steps = cfg.sample.sampler, cfg.sample.steps
    if sampler == "ddpm":
        return None
    C, T = 4, scheduler.config.num_train_timesteps
    learned = cfg.diffusion.objective == "ddpm" and cfg.model.learn_sigma

    def toy(x, t):  # t in [0, 1], as ldmkit's models take it
        out = x * (0.3 + 0.5 * t.float().reshape(-1, 1, 1, 1))
        return torch.cat([out, torch.zeros_like(out)], 1) if learned else out

    x = torch.randn(1, C, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    if sampler == "dpmpp":
        ours = sample_dpmpp(toy, build_objective(cfg), x, steps, cfg, cfg.sample.solver_order)
    elif cfg.diffusion.objective == "flow":
        ours = sample_flow(toy, x, noise_levels(cfg, steps), sampler)
    else:
        objective = build_objective(cfg)
        ours = sample_ddpm(toy, objective, x, [torch.Generator()], steps, cfg.sample.respacing, "ddim")
    scheduler.set_timesteps(**({"sigmas": sigmas} if sigmas else {"num_inference_steps": steps}))
    y = x.clone()
    for t in scheduler.timesteps:
        scale = getattr(scheduler, "scale_model_input", lambda sample, timestep: sample)
        out = toy(scale(y, t), t.reshape(1) / T)
        y = scheduler.step(out if passes_variance else out[:, :C], t, y).prev_sample
    return float((ours - y).abs().max())


def pipeline_vae(cfg: RunConfig, applies_shift: bool):
    """The run's AutoencoderKL with ldmkit's latent scale and shift in its config, or None in pixel space."""
    if cfg.autoencoder.name == "identity":
        return None, ["pixel-space run: the pipeline has no VAE (vae is empty); its denoiser works on images"]
    autoencoder = build_autoencoder(cfg.autoencoder, cfg.data.channels)
    vae = autoencoder.vae
    vae.register_to_config(scaling_factor=autoencoder.scaling_factor, shift_factor=autoencoder.shift_factor)
    notes = []
    if autoencoder.shift_factor and not applies_shift:
        notes.append(f"this pipeline decodes without the VAE's shift_factor {autoencoder.shift_factor:g}")
    return vae, notes


def export_pipeline(
    model: nn.Module,
    cfg_dict: dict,
    spec: BackboneSpec,
    out: str | Path,
    images_seen: int | None = None,
    metrics: dict | None = None,
    source: str | None = None,
) -> Path:
    """Write the complete diffusers pipeline folder (see the module docstring); returns out."""
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # not "vae=None cannot be saved" nor the accelerate advice
    check_exportable(model, cfg_dict, spec)
    cfg = build(RunConfig, cfg_dict)
    pipeline_class = spec.diffusers_pipeline(model)
    parts = PIPELINES[pipeline_class]
    out = Path(out)
    scheduler, scheduler_notes = diffusers_scheduler(cfg, parts.passes_variance)
    vae, vae_notes = pipeline_vae(cfg, parts.applies_shift)
    reference, model_notes = spec.to_diffusers(model)
    components = {spec.diffusers_folder: reference, "scheduler": scheduler, "vae": vae}
    components.update({name: None for name in parts.text}, **dict(parts.extra))
    getattr(diffusers, pipeline_class)(**components).save_pretrained(out)  # every part, the denoiser once
    model_info = describe_export(model, spec, reference, model_notes, out / spec.diffusers_folder)
    gaps = {"default": sampler_gap(cfg, scheduler, parts.passes_variance)}
    flow_uniform = cfg.diffusion.objective == "flow" and cfg.sample.sigma_schedule == "uniform"
    if flow_uniform and "sigmas" in inspect.signature(scheduler.set_timesteps).parameters:
        gaps["sigmas"] = sampler_gap(cfg, scheduler, parts.passes_variance, ldmkit_flow_sigmas(cfg.sample.steps))
    if cfg.autoencoder.name == "kl":  # the pipeline's own VAE, for ldmkit too (relative to this folder)
        cfg_dict = {**cfg_dict, "autoencoder": {**cfg_dict["autoencoder"], "path": "vae", "subfolder": None}}
    (out / LDMKIT_CONFIG).write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    record = {
        "pipeline": pipeline_class,
        "scheduler": type(scheduler).__name__,
        "images_seen": images_seen,
        "source": source,
        "parameters": count_parameters(model),
        "diffusers_output_gap": model_info["diffusers_output_gap"],
        "mean_abs_output": model_info["mean_abs_output"],
        "sampler_gap": gaps,
        "notes": model_info["notes"] + scheduler_notes + vae_notes + pipeline_notes(cfg, pipeline_class),
        "metrics": metrics or {},
    }
    (out / "ldmkit.json").write_text(json.dumps(record, indent=1))
    (out / "README.md").write_text(model_card(cfg, cfg_dict, record, out, spec.diffusers_folder))
    return out


def ldmkit_flow_sigmas(steps: int) -> list[float]:
    """The unshifted noise levels of ldmkit's flow grid: 1, 1 - 1/n, ..., 1/n (the scheduler shifts them and ends
    at 0)."""
    return [1 - k / steps for k in range(steps)]


def pipeline_notes(cfg: RunConfig, pipeline_class: str) -> list[str]:
    """What the diffusers pipeline class cannot do for this run (DiTPipeline's ImageNet assumptions)."""
    notes = []
    if pipeline_class == "DiTPipeline" and cfg.model.num_classes != 1000:
        notes.append(
            f"DiTPipeline guides with class 1000 as the null class; this model has {cfg.model.num_classes} classes "
            f"(null class {cfg.model.num_classes}): call it with guidance_scale=1, or guide with ldmkit"
        )
    if pipeline_class == "DiTPipeline" and cfg.diffusion.objective == "flow":
        notes.append(
            "DiTPipeline calls scheduler.scale_model_input, which diffusers' flow schedulers lack: run the "
            "transformer and scheduler in a loop of your own, or sample with ldmkit"
        )
    return notes


def model_card(cfg: RunConfig, cfg_dict: dict, record: dict, out: Path, folder: str) -> str:
    """README.md of an exported pipeline: what the model is, how it was trained, how well, how to run it."""
    m, d, s = cfg.model, cfg.data, cfg.sample
    text = m.conditioning != "class"
    conditioning = f"class ({m.num_classes} classes)"
    if text:
        conditioning = f"text ({cfg.text.encoder} encoder, {cfg.text.max_length} tokens)"
    objective = (
        f"rectified flow (time shift {flow_shift(cfg):g})"
        if cfg.diffusion.objective == "flow"
        else f"DDPM, epsilon{' + learned variance' if m.learn_sigma else ''}, {cfg.diffusion.num_timesteps} steps"
    )
    autoencoder = "none (pixel space)"
    if cfg.autoencoder.name == "kl":
        vae = json.loads((out / "vae" / "config.json").read_text())
        autoencoder = f"AutoencoderKL in vae/ (latents = (z - {vae['shift_factor']:g}) * {vae['scaling_factor']:g})"
    seen = record["images_seen"]
    gaps = record["sampler_gap"]
    gap_line = "stochastic (DDPM): not compared" if gaps["default"] is None else f"{gaps['default']:.3g}"
    if "sigmas" in gaps:
        gap_line += f"; with `sigmas=ldmkit_sigmas` below: {gaps['sigmas']:.3g}"
    rows = [
        ("backbone", f"{m.name} {m.preset or ''} ({record['parameters'] / 1e6:.2f}M parameters)"),
        ("conditioning", conditioning),
        ("objective", objective),
        ("data", f"{d.name}{' ' + d.path if d.path else ''}, {d.resolution} px, {d.channels} channels"),
        ("autoencoder", autoencoder),
        ("images seen", f"{seen:,}" if seen is not None else "unknown"),
        ("weights", record["source"] or "unknown"),
        ("diffusers pipeline", f"`{record['pipeline']}` with `{record['scheduler']}`"),
        (
            "denoiser vs ldmkit",
            f"max difference {record['diffusers_output_gap']:.3g} on a probe input (mean absolute output "
            f"{record['mean_abs_output']:.3g})",
        ),
        (f"scheduler vs ldmkit's {s.sampler} ({s.steps} steps)", f"max difference on a toy chain: {gap_line}"),
    ]
    lines = [
        "---",
        "library_name: diffusers",
        f"tags: [ldmkit, {m.name}, {cfg.diffusion.objective}, {'text-to-image' if text else 'class-conditional'}]",
        "---",
        f"# {cfg.name}: {m.name} exported from ldmkit",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in rows],
        "",
        "## Metrics",
        "",
    ]
    scalars = {k: v for k, v in record["metrics"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    lines += [f"- {k}: {v:.6g}" for k, v in scalars.items()] or ["No metrics were recorded for this run."]
    lines += ["", "## Use with diffusers", "", "```python", *diffusers_snippet(cfg, record, folder), "```", ""]
    lines += ["## Use with ldmkit", "", "```python", "import ldmkit", "", 'pipe = ldmkit.load(".")  # this folder']
    call = 'prompt=["a photo"]' if text else "class_labels=[0, 1]"
    lines += [f"images = pipe({call})", "```", ""]
    if record["notes"]:
        lines += ["## Differences from ldmkit", "", *[f"- {note}" for note in record["notes"]], ""]
    lines += ["## Config", "", "```yaml", yaml.safe_dump(cfg_dict, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def diffusers_snippet(cfg: RunConfig, record: dict, folder: str) -> list[str]:
    pipeline_class, s = record["pipeline"], cfg.sample
    parts = PIPELINES[pipeline_class]
    empty = ", ".join(f"{name}=None" for name in parts.text + (("vae",) if cfg.autoencoder.name == "identity" else ()))
    lines = ["from diffusers import DiffusionPipeline", ""]
    lines.append(f'pipe = DiffusionPipeline.from_pretrained("."{", " + empty if empty else ""})')
    call = parts.call
    if cfg.model.conditioning != "class":
        lines[1:1] = ["from ldmkit.conditioning.text_encoders import TextEncoder"]
        encoder = f'TextEncoder("{cfg.text.encoder}", {cfg.text.path!r}, {cfg.text.max_length})'
        lines += [
            f"encoder = {encoder}  # the run's text encoder",
            'text = encoder(["a photo"])',
            "null = encoder([''])  # or ldmkit's own null caption for guidance: see the notes",
        ]
    if "sigmas" in record["sampler_gap"]:
        lines.append(f"ldmkit_sigmas = [1 - k / {s.steps} for k in range({s.steps})]  # ldmkit's noise levels")
        call += ", sigmas=ldmkit_sigmas"
    guidance = 1.0 if any("null class" in n for n in record["notes"]) else s.guidance_scale
    call += f", num_inference_steps={s.steps}, guidance_scale={guidance:g}"
    if cfg.autoencoder.name == "identity":
        call += ', output_type="latent"'  # pixel space: the "latents" are the images, in [-1, 1]
    lines.append(f"images = pipe({call}).images")
    return lines
