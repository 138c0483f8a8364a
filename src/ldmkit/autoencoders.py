"""Autoencoders between images in [-1, 1] and the latents the backbone sees.

`identity` keeps pixel space (the demo). `kl` wraps diffusers' AutoencoderKL, loaded from a local folder or
a hub id (SD ft-EMA/MSE: 4 channels, scale 0.18215; SDXL: scale 0.13025; SD3: 16 channels, scale 1.5305,
shift 0.0609): latents = (z - shift) * scale. No weights ship with ldmkit; tests build a tiny random
AutoencoderKL, save it with save_pretrained and load it through this same path.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn


class IdentityAutoencoder(nn.Module):
    downsample = 1

    def __init__(self, channels: int):
        super().__init__()
        self.latent_channels = channels

    def encode(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


class KLAutoencoder(nn.Module):
    def __init__(self, vae, scaling_factor: float, shift_factor: float = 0.0, sample_posterior: bool = True):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor, self.shift_factor = scaling_factor, shift_factor
        self.sample_posterior = sample_posterior
        self.latent_channels = vae.config.latent_channels
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, 3, H, W] in [-1, 1] -> latents [B, C, H/f, W/f]. `noise` (the caller's seeded draw)
        samples the posterior: z = mean + std * noise; without it, the mean."""
        posterior = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        z = posterior.mean
        if self.sample_posterior and noise is not None:
            z = z + posterior.std * noise.to(z.dtype)
        return ((z - self.shift_factor) * self.scaling_factor).float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode((z / self.scaling_factor + self.shift_factor).to(self.vae.dtype)).sample.float()


def build_autoencoder(ae_cfg, image_channels: int) -> nn.Module:
    from .config import ConfigError

    if ae_cfg.name == "identity":
        return IdentityAutoencoder(image_channels)
    if not ae_cfg.path:
        raise ConfigError("config key 'autoencoder.path': the kl autoencoder needs a local folder or hub id")
    from diffusers import AutoencoderKL

    local = Path(ae_cfg.path).expanduser()
    try:
        vae = AutoencoderKL.from_pretrained(str(local) if local.exists() else ae_cfg.path, subfolder=ae_cfg.subfolder)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"config key 'autoencoder.path': cannot load AutoencoderKL from {ae_cfg.path!r} "
            f"({str(e).splitlines()[0][:160]}); give a local folder holding config.json and the weights"
        ) from None
    if image_channels != vae.config.in_channels:
        raise ConfigError(f"config key 'data.channels': the autoencoder takes {vae.config.in_channels}-channel images, the data has {image_channels}")
    return KLAutoencoder(vae, ae_cfg.scaling_factor, ae_cfg.shift_factor, ae_cfg.sample_posterior)
