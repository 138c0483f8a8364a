"""The Python API (`import ldmkit`): load a run as a pipeline and call it, train from a config, evaluate a run.
The same functions the command line runs; docs/python.md shows them in use."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from PIL import Image

from .config import RunConfig, build, load_config, run_config, set_sampling, to_dict
from .distributed import pick_device
from .eval.evaluate import SampleSettings, evaluate_run, load_generator
from .eval.generate import generate
from .training.loop import training_loop
from .transfer.convert import load_any
from .transfer.pipeline import export_pipeline


class Pipeline:
    """A trained model ready to sample: the denoiser, its objective and autoencoder, and the run's config.
    `pipe(class_labels=[3, 7])` or `pipe(prompt=["a cat"])` returns PIL images (or a tensor)."""

    def __init__(self, model, cfg: RunConfig, objective, autoencoder, device="cpu", source: str | None = None):
        self.model, self.cfg, self.objective, self.autoencoder = model, cfg, objective, autoencoder
        self.device, self.source = torch.device(device), source
        self._text_encoder = None

    @classmethod
    def from_run(cls, path, device: str = "auto", use_ema: bool = True, config=None, overrides=None) -> "Pipeline":
        """A run folder (its newest intact checkpoint) or an ldmkit checkpoint file."""
        where = pick_device(device, "device")
        cfg, model, objective, autoencoder, _ = load_generator(path, use_ema, where, config, overrides)
        return cls(model, cfg, objective, autoencoder, where, str(path))

    @classmethod
    def from_pretrained(cls, path, device: str = "auto", config=None, overrides=None) -> "Pipeline":
        """A folder written by `save_pretrained` / `ldmkit export`, a diffusers model folder of a supported backbone,
        or official weights (DiT, MDT): the backbone is recognised from the weights."""
        from .autoencoders import build_autoencoder
        from .diffusion.objectives import build_objective

        where = pick_device(device, "device")
        model, cfg_dict, _, _ = load_any(path, config, overrides)
        cfg = build(RunConfig, cfg_dict)
        autoencoder = build_autoencoder(cfg.autoencoder, cfg.data.channels).to(where)
        return cls(model.to(where).eval(), cfg, build_objective(cfg), autoencoder, where, str(path))

    def to(self, device) -> "Pipeline":
        self.device = torch.device(device)
        self.model.to(self.device)
        self.autoencoder.to(self.device)
        self._text_encoder = None  # rebuilt on the new device when needed
        return self

    def save_pretrained(self, folder) -> Path:
        """A diffusers pipeline folder (as `ldmkit export`), with the run's config: from_pretrained restores it."""
        from .models.registry import spec_of

        return export_pipeline(self.model, to_dict(self.cfg), spec_of(self.model), folder, source=self.source)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | None = None,
        prompt: str | list[str] | None = None,
        negative_class_labels: list[int] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        seed: int = 0,
        control: list[str] | None = None,
        control_guidance_scale: float | None = None,
        output_type: str = "pil",
        **sample_settings,
    ):
        """Images for the given classes (class-conditional runs) or prompts (text runs), one per entry; sample i
        uses a seed derived from (seed, i), as `ldmkit sample` does. Negative classes or prompts replace the null
        condition in guidance. control: values such as ["original_size=512,512", "flip=0"] for runs that embed
        them. output_type "pil" (a list of images) or "pt" (a tensor [N, C, H, W] in [-1, 1]). Any other keyword
        is a sample.* setting for this call, e.g. guidance_schedule="power_cosine", guidance_interval=[0.28, 5.42],
        guided_channels=3, skip_layers=[7, 8, 9] with skip_layer_scale=2.5, sigma_schedule="sd3"."""
        cfg = set_sampling(copy.deepcopy(self.cfg), **sample_settings)
        cfg.sample.control = list(cfg.sample.control) + list(control or [])
        if control_guidance_scale is not None:
            cfg.sample.control_guidance_scale = control_guidance_scale
        prompts = [prompt] if isinstance(prompt, str) else prompt
        negative_prompts = [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
        labels, negative_labels = self._conditions(class_labels, prompts, negative_class_labels, negative_prompts)
        if negative_prompts is not None and len(negative_prompts) == 1 and len(labels) > 1:
            negative_prompts = negative_prompts * len(labels)
        if output_type not in ("pil", "pt"):
            raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
        images = generate(
            self.model,
            cfg,
            self.objective,
            self.autoencoder,
            labels,
            list(range(len(labels))),
            self.device,
            guidance_scale=guidance_scale,
            sampler=sampler,
            steps=num_inference_steps,
            seed=seed,
            prompts=prompts,
            text_encoder=self.text_encoder(),
            negative_labels=negative_labels,
            negative_prompts=negative_prompts,
        )
        return images if output_type == "pt" else to_pil(images)

    def _conditions(self, class_labels, prompts, negative_class_labels, negative_prompts):
        text = self.cfg.model.conditioning != "class"
        if text and (class_labels is not None or negative_class_labels is not None):
            raise ValueError("this run is text-conditional: give prompt (and negative_prompt), not class labels")
        if not text and (prompts is not None or negative_prompts is not None):
            raise ValueError("this run is class-conditional: give class_labels (and negative_class_labels)")
        if text:
            if not prompts:
                raise ValueError("give prompt: one caption or a list of captions")
            if negative_prompts is not None and len(negative_prompts) not in (1, len(prompts)):
                raise ValueError(f"negative_prompt: 1 or {len(prompts)} captions, got {len(negative_prompts)}")
            return torch.arange(len(prompts)), None
        if not class_labels:
            raise ValueError("give class_labels: a list of class ids")
        labels = torch.tensor(list(class_labels))
        negative = None
        if negative_class_labels is not None:
            negative = torch.tensor(list(negative_class_labels))
            if len(negative) == 1:
                negative = negative.repeat(len(labels))
            if len(negative) != len(labels):
                raise ValueError(f"negative_class_labels: 1 or {len(labels)} ids, got {len(negative)}")
        return labels, negative

    def text_encoder(self):
        if self.cfg.model.conditioning == "class":
            return None
        if self._text_encoder is None:
            from .conditioning.build import build_text_encoder

            self._text_encoder = build_text_encoder(self.cfg, self.device)
        return self._text_encoder


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[N, C, H, W] in [-1, 1] -> PIL images (grayscale for one channel), quantised as a saved PNG would be."""
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]


def load(path, device: str = "auto", **kwargs) -> Pipeline:
    """A pipeline from a run folder or ldmkit checkpoint, or from an exported / diffusers / official model folder
    or file (see Pipeline.from_run and Pipeline.from_pretrained)."""
    path = Path(path)
    is_run = (path / "checkpoints").is_dir() or path.suffix in (".pt", ".pth", ".ckpt")
    if is_run:
        try:
            return Pipeline.from_run(path, device, **kwargs)
        except ValueError as e:
            if "not an ldmkit checkpoint" not in str(e):
                raise
    return Pipeline.from_pretrained(path, device, **kwargs)


def train(config, overrides: list[str] | None = None, out=None, resume: bool = False) -> Path:
    """Train from a config (a file, a shipped config's name such as "demo/mnist_dit", or a RunConfig) with
    KEY=VALUE overrides, into out (default runs/<name>). Re-running continues from the newest checkpoint.
    Returns the run folder."""
    if isinstance(config, RunConfig):
        cfg = run_config(to_dict(config), None, overrides)
    else:
        cfg = load_config(config, overrides)
    return training_loop(cfg, Path(out or Path("runs") / cfg.name), allow_config_change=resume)


def evaluate(run, device: str = "auto", **settings) -> dict:
    """Generate a run's evaluation sample set and compute its metrics (as `ldmkit eval RUN`); settings are
    SampleSettings fields: num_images, guidance_scale, steps, sampler, seed, control, control_guidance, config,
    overrides. Returns the metrics."""
    metrics, _, _ = evaluate_run(run, SampleSettings(**settings), device=device)
    return metrics
