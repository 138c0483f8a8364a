"""Autoencoders between images in [-1, 1] and the latents the backbone sees.

`identity` keeps pixel space (the demo). `kl` wraps diffusers' AutoencoderKL, loaded from a local folder or
a hub id, with one of the published latent layouts (VAE_LAYOUTS: SD ft-EMA/MSE 4 channels, scale 0.18215;
SDXL 4 channels, scale 0.13025; SD3 16 channels, scale 1.5305, shift 0.0609): latents = (z - shift) * scale.
No weights ship with ldmkit; tests build a tiny random AutoencoderKL, save it with save_pretrained and load
it through this same path.
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

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.float(), torch.zeros_like(x, dtype=torch.float32)

    def latents(self, mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        return mean.float()

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
    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, 3, H, W] in [-1, 1] -> posterior (mean, std), each [B, C, H/f, W/f], unscaled (what the cache
        stores)."""
        posterior = self.vae.encode(x.to(self.vae.dtype)).latent_dist
        return posterior.mean.float(), posterior.std.float()

    def latents(self, mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Posterior moments -> scaled latents; `noise` (the caller's seeded draw) samples z = mean + std * noise."""
        z = mean.float()
        if self.sample_posterior and noise is not None:
            z = z + std.float() * noise.to(z.dtype)
        return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def encode(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, 3, H, W] in [-1, 1] -> latents [B, C, H/f, W/f], sampled with `noise` or the mean without it."""
        return self.latents(*self.moments(x), noise)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode((z / self.scaling_factor + self.shift_factor).to(self.vae.dtype)).sample.float()


# The published latent layouts: channels, scaling factor, shift factor.
VAE_LAYOUTS = {
    "sd": dict(latent_channels=4, scaling_factor=0.18215, shift_factor=0.0),  # SD 1.x/2.x, sd-vae-ft-ema/mse (LDM, DiT)
    "sdxl": dict(latent_channels=4, scaling_factor=0.13025, shift_factor=0.0),  # SDXL VAE
    "sd3": dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609),  # SD3 VAE
}


def build_autoencoder(ae_cfg, image_channels: int) -> nn.Module:
    from .config import ConfigError

    if ae_cfg.name == "identity":
        return IdentityAutoencoder(image_channels)
    if not ae_cfg.path:
        raise ConfigError("config key 'autoencoder.path': the kl autoencoder needs a local folder or hub id")
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # not the "accelerate not installed" advice at every load
    local = Path(ae_cfg.path).expanduser()
    try:
        vae = AutoencoderKL.from_pretrained(str(local) if local.exists() else ae_cfg.path, subfolder=ae_cfg.subfolder)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"config key 'autoencoder.path': cannot load AutoencoderKL from {ae_cfg.path!r} "
            f"({str(e).splitlines()[0][:160]}); give a local folder holding config.json and the weights"
        ) from None
    if image_channels != vae.config.in_channels:
        raise ConfigError(
            f"config key 'data.channels': the autoencoder takes {vae.config.in_channels}-channel images, the data "
            f"has {image_channels}"
        )
    layout = VAE_LAYOUTS.get(ae_cfg.layout, {})
    if layout and vae.config.latent_channels != layout["latent_channels"]:
        raise ConfigError(
            f"config key 'autoencoder.layout': {ae_cfg.layout} latents have {layout['latent_channels']} channels, "
            f"the VAE at {ae_cfg.path} gives {vae.config.latent_channels}"
        )
    # Explicit value > layout > the VAE's own config (diffusers stores scaling_factor and, for SD3, shift_factor).
    scale = (
        ae_cfg.scaling_factor
        if ae_cfg.scaling_factor is not None
        else layout.get("scaling_factor", vae.config.scaling_factor)
    )
    shift = (
        ae_cfg.shift_factor
        if ae_cfg.shift_factor is not None
        else layout.get("shift_factor", getattr(vae.config, "shift_factor", None) or 0.0)
    )
    return KLAutoencoder(vae, float(scale), float(shift), ae_cfg.sample_posterior)
