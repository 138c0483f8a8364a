"""Building the `Cond` a backbone takes from a training batch, from class labels or from prompts."""

from __future__ import annotations

import torch

from .cond import Cond
from .text_encoders import TextEmbedding, TextEncoder


def build_text_encoder(cfg, device) -> TextEncoder | None:
    """The configured text encoder (text.encoder), or None when the run has none."""
    if cfg.text.encoder == "none":
        return None
    from ..config import ConfigError

    try:
        return TextEncoder(cfg.text.encoder, cfg.text.path, cfg.text.max_length).to(device)
    except ValueError as e:
        raise ConfigError(f"config key 'text.path': {e}") from None


def text_cond(text: TextEmbedding, labels: torch.Tensor | None = None, drop: torch.Tensor | None = None) -> Cond:
    return Cond(
        class_labels=labels,
        context=text.tokens.float(),
        context_mask=text.mask,
        pooled=text.pooled.float(),
        drop_semantic=drop,
    )


def pad_captions(cfg, text: TextEmbedding, seeds: list[int]) -> TextEmbedding:
    """conditioning.padding applied to caption tokens; noisy_replicate draws each caption's noise from its seed
    (so the noise does not depend on how samples are split across processes)."""
    from .padding import pad_text

    cc = cfg.conditioning
    if cc.padding == "zero":
        return text
    rows = [
        pad_text(
            text.tokens[i : i + 1],
            text.mask[i : i + 1],
            cc.padding,
            cc.padding_sigma,
            torch.Generator(text.tokens.device).manual_seed(int(s) % (2**63 - 1)),
        )
        for i, s in enumerate(seeds)
    ]
    return TextEmbedding(torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]), text.pooled)


def cond_from_batch(
    cfg,
    batch: dict,
    text_encoder: TextEncoder | None,
    drop: torch.Tensor,
    device,
    drop_control: torch.Tensor | None = None,
    padding_seeds: list[int] | None = None,
) -> Cond:
    """A micro-batch (raw or cached) -> Cond: class labels or text (encoded now, or read from the cache),
    the crop metadata as named control values, and the guidance-dropout masks."""
    control = {k: v.to(device, non_blocking=True) for k, v in batch["control"].items()}
    labels = batch["label"].to(device, non_blocking=True)
    if cfg.model.conditioning == "class":
        return Cond(class_labels=labels, control=control, drop_semantic=drop, drop_control=drop_control)
    if "text_pooled" in batch:
        text = TextEmbedding(
            batch["text_tokens"].to(device), batch["text_mask"].to(device), batch["text_pooled"].to(device)
        )
    else:
        text = text_encoder(list(batch["caption"]))
    if cfg.model.conditioning == "text":
        text = pad_captions(cfg, text, padding_seeds if padding_seeds is not None else list(range(len(labels))))
    cond = text_cond(text, labels, drop)
    cond.control, cond.drop_control = control, drop_control
    return cond


def prompts_for_labels(cfg, labels: torch.Tensor) -> list[str]:
    """Prompts of a text-conditional run's class rows: sample.class_prompts[label]."""
    prompts = cfg.sample.class_prompts
    if not prompts:
        from ..config import ConfigError

        raise ConfigError(
            "config key 'sample.class_prompts': a text-conditional run needs prompts (one per class row) or --prompt"
        )
    if int(labels.max()) >= len(prompts):
        raise ValueError(f"class {int(labels.max())} has no prompt in sample.class_prompts ({len(prompts)} given)")
    return [prompts[int(i)] for i in labels]


def sampling_cond(
    cfg, labels: torch.Tensor | None, prompts: list[str] | None, text_encoder: TextEncoder | None, device
) -> Cond:
    """Cond for generation: class labels, or the text embedding of prompts."""
    if cfg.model.conditioning == "class":
        cond = Cond(class_labels=labels.to(device))
    elif text_encoder is None:
        raise ValueError("a text-conditional model needs its text encoder to sample")
    else:
        cond = text_cond(text_encoder(list(prompts)), labels.to(device) if labels is not None else None)
    if cfg.model.conditioning == "text":
        text = pad_captions(
            cfg, TextEmbedding(cond.context, cond.context_mask, cond.pooled), list(range(cond.batch_size))
        )
        cond.context, cond.context_mask = text.tokens, text.mask
    if cfg.model.micro_conditions or cfg.conditioning.control:
        cond.control = sampling_control(cfg, cond.batch_size, device)
    return cond


def check_sampling_control(cfg) -> None:
    """Control values asked for (sample.control, --control) must be ones the run embeds, and well formed."""
    from ..config import ConfigError

    if not cfg.sample.control:
        return
    if not (cfg.model.micro_conditions or cfg.conditioning.control):
        raise ConfigError(
            f"config key 'sample.control': this run embeds no control values, so "
            f"{cfg.sample.control[0]!r} would be ignored"
        )
    sampling_control(cfg, 1, "cpu")


def sampling_control(cfg, n: int, device) -> dict[str, torch.Tensor]:
    """Control values to sample with: an uncropped, unflipped image of the training resolution, overridden by
    sample.control entries 'key=v1,v2' (e.g. 'original_size=512,512', 'flip=1')."""
    from ..config import CONTROL_SIZES, ConfigError

    side = float(cfg.data.resolution)
    values = {
        "original_size": [side, side],
        "crop_top_left": [0.0, 0.0],
        "crop_size": [side, side],
        "target_size": [side, side],
        "aspect_ratio": [1.0],
        "flip": [0.0],
    }
    for entry in cfg.sample.control:
        key, _, raw = str(entry).partition("=")
        key = key.strip()
        if key not in CONTROL_SIZES:
            raise ConfigError(
                f"config key 'sample.control': unknown control {key!r} (known: {', '.join(CONTROL_SIZES)})"
            )
        try:
            parsed = [float(v) for v in raw.split(",")]
        except ValueError:
            parsed = []
        if len(parsed) != CONTROL_SIZES[key]:
            raise ConfigError(
                f"config key 'sample.control': {key} takes {CONTROL_SIZES[key]} comma-separated number(s), got {raw!r}"
            )
        values[key] = parsed
    return {k: torch.tensor(v, device=device).expand(n, -1).clone() for k, v in values.items()}
