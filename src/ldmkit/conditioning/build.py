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
    return Cond(class_labels=labels, context=text.tokens.float(), context_mask=text.mask, pooled=text.pooled.float(), drop_semantic=drop)


def cond_from_batch(cfg, batch: dict, text_encoder: TextEncoder | None, drop: torch.Tensor, device) -> Cond:
    """A micro-batch (raw or cached) -> Cond: class labels or text (encoded now, or read from the cache),
    the crop metadata as named control values, and the guidance-dropout mask."""
    control = {k: v.to(device, non_blocking=True) for k, v in batch["control"].items()}
    labels = batch["label"].to(device, non_blocking=True)
    if cfg.model.conditioning == "class":
        return Cond(class_labels=labels, control=control, drop_semantic=drop)
    if "text_pooled" in batch:
        text = TextEmbedding(batch["text_tokens"].to(device), batch["text_mask"].to(device), batch["text_pooled"].to(device))
    else:
        text = text_encoder(list(batch["caption"]))
    cond = text_cond(text, labels, drop)
    cond.control = control
    return cond


def prompts_for_labels(cfg, labels: torch.Tensor) -> list[str]:
    """Prompts of a text-conditional run's class rows: sample.class_prompts[label]."""
    prompts = cfg.sample.class_prompts
    if not prompts:
        from ..config import ConfigError

        raise ConfigError("config key 'sample.class_prompts': a text-conditional run needs prompts (one per class row) or --prompt")
    if int(labels.max()) >= len(prompts):
        raise ValueError(f"class {int(labels.max())} has no prompt in sample.class_prompts ({len(prompts)} given)")
    return [prompts[int(i)] for i in labels]


def sampling_cond(cfg, labels: torch.Tensor | None, prompts: list[str] | None, text_encoder: TextEncoder | None, device) -> Cond:
    """Cond for generation: class labels, or the text embedding of prompts."""
    if cfg.model.conditioning == "class":
        cond = Cond(class_labels=labels.to(device))
    elif text_encoder is None:
        raise ValueError("a text-conditional model needs its text encoder to sample")
    else:
        cond = text_cond(text_encoder(list(prompts)), labels.to(device) if labels is not None else None)
    if cfg.model.micro_conditions:  # sample at the training resolution, as if from an uncropped image of that size
        n, side = cond.batch_size, float(cfg.data.resolution)
        cond.control = {k: torch.full((n, 2), side, device=device) for k in ("original_size", "target_size")}
    return cond
