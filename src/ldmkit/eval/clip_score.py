"""CLIP score (Hessel et al. 2021) through torchmetrics' CLIPScore, with a transformers CLIP model from a local
folder or a hub id (mosaicml/diffusion reports openai/clip-vit-base-patch16).

Two things break between torchmetrics 1.x and transformers 5, fixed here rather than patched in place:
`get_image_features` / `get_text_features` now return a ModelOutput (the projected embedding is its
`pooler_output`), and torchmetrics only loads model names containing "openai", "jinaai" or "zer0int", so a
local folder is refused. `clip_score_metric` loads the model itself and hands torchmetrics an adapter that
returns the tensors torchmetrics expects.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn


class FeatureTensors(nn.Module):
    """A transformers CLIPModel whose get_*_features return the projected embeddings as tensors."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def clip_score_metric(path: str):
    """torchmetrics' CLIPScore for the CLIP model at path (a folder with the model and its processor, or a hub id)."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    local = Path(str(path)).expanduser()
    source = str(local) if local.exists() else str(path)
    try:
        model, processor = CLIPModel.from_pretrained(source).eval(), CLIPProcessor.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the CLIP model from {path!r}: {str(e).splitlines()[0][:160]}") from None
    return CLIPScore(model_name_or_path=lambda: (FeatureTensors(model), processor))


@torch.no_grad()
def update_clip_score(metric, images: torch.Tensor, prompts: list[str], batch: int = 64) -> None:
    """Add images [N, C, H, W] in [-1, 1] (quantised as saved images are) and their prompts to the metric."""
    pixels = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if pixels.shape[1] == 1:
        pixels = pixels.repeat(1, 3, 1, 1)
    for lo in range(0, len(pixels), batch):
        metric.update(list(pixels[lo : lo + batch]), list(prompts[lo : lo + batch]))


def clip_score(images: torch.Tensor, prompts: list[str], path: str, batch: int = 64) -> float:
    """Mean CLIP score of images [N, C, H, W] in [-1, 1] against their prompts (100 x cosine, floored at 0)."""
    metric = clip_score_metric(path)
    update_clip_score(metric, images, prompts, batch)
    return float(metric.compute())
