"""Noise schedules. DDPM quantities are float64 numpy arrays (as ADM/DiT keep them) and are gathered per
sample as float32 tensors. The backbone contract's noise level is t in [0, 1] (1 = pure noise): DDPM
step k is t = k / num_timesteps; rectified flow uses t = sigma directly.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..config import ConfigError


def ddpm_betas(schedule: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    if schedule == "linear":
        # DiT/ADM: the 1000-step endpoints, rescaled when the number of steps differs.
        scale = 1000 / num_timesteps
        if not 0 < scale * beta_start < 1 or not 0 < scale * beta_end < 1:
            raise ConfigError(
                f"config key 'diffusion.num_timesteps': {num_timesteps} steps rescale the linear betas "
                f"[{beta_start}, {beta_end}] by 1000 / {num_timesteps} to outside (0, 1)"
            )
        return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)
    if schedule == "scaled_linear":
        # LDM / Stable Diffusion: linear in sqrt(beta) (latent-diffusion linear_start 0.00085 or 0.0015,
        # linear_end 0.012 or 0.0195).
        return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2
    if schedule == "cosine":

        def alpha_bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [
                min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
                for i in range(num_timesteps)
            ],
            dtype=np.float64,
        )
    raise ValueError(f"unknown beta schedule {schedule!r}")


class DDPMSchedule:
    """Forward-process and posterior coefficients of a (possibly respaced) DDPM chain.

    `timesteps[i]` is the original step index the model sees for position i of this chain.
    """

    def __init__(self, betas: np.ndarray, timesteps: np.ndarray | None = None, num_train_timesteps: int | None = None):
        self.betas = np.asarray(betas, dtype=np.float64)
        self.num_steps = len(self.betas)
        self.timesteps = np.arange(self.num_steps) if timesteps is None else np.asarray(timesteps)
        self.num_train_timesteps = num_train_timesteps or self.num_steps
        alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at the chain's start; ADM clips the log to the next value.
        first = self.posterior_variance[1] if self.num_steps > 1 else self.betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(self.betas)
        # ADM's fixed 'large' variance, for models without learned sigma.
        self.log_variance_fixed_large = np.log(np.append(first, self.betas[1:]))

    def gather(self, name: str, index: torch.Tensor, ndim: int = 4) -> torch.Tensor:
        """Per-sample coefficient `name` at chain positions index [B], shaped [B, 1, 1, 1]."""
        values = torch.from_numpy(getattr(self, name)).to(index.device)[index].float()
        return values.reshape(-1, *([1] * (ndim - 1)))

    def model_time(self, index: torch.Tensor) -> torch.Tensor:
        """The contract's t in [0, 1) for chain positions index: original step / num_train_timesteps."""
        original = torch.from_numpy(self.timesteps).to(index.device)[index]
        return original.float() / self.num_train_timesteps

    def respace(self, use_timesteps) -> "DDPMSchedule":
        """A shorter chain over the given original steps, with betas chosen so that alphas_cumprod
        matches the original at those steps (ADM's SpacedDiffusion)."""
        use = sorted(set(int(t) for t in use_timesteps))
        last, betas = 1.0, []
        for i, acp in enumerate(self.alphas_cumprod):
            if i in use:
                betas.append(1 - acp / last)
                last = acp
        return DDPMSchedule(np.array(betas), np.array(use), self.num_train_timesteps)


def space_timesteps(num_timesteps: int, steps: int, mode: str = "adm") -> list[int]:
    """Which original steps a `steps`-step sampler visits (ascending).

    adm: round(linspace(0, T-1, steps)), as ADM/DiT `space_timesteps(T, str(steps))` (also diffusers
    'linspace'); leading: 0, T/steps, ... (diffusers default); trailing: ..., T-1 (Lin et al. 2024).
    """
    if not 0 < steps <= num_timesteps:
        raise ValueError(f"sampling steps must be in 1..{num_timesteps}, got {steps}")
    if mode in ("adm", "linspace"):
        if steps == 1:
            return [num_timesteps - 1]
        stride = (num_timesteps - 1) / (steps - 1)
        return sorted({round(i * stride) for i in range(steps)})
    ratio = num_timesteps // steps
    if mode == "leading":
        return [i * ratio for i in range(steps)]
    if mode == "trailing":
        return sorted(np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)).astype(int) - 1)
    raise ValueError(f"unknown respacing {mode!r}")


def shift_log_snr(betas: np.ndarray, factor: float) -> np.ndarray:
    """Betas whose log-SNR is the given chain's minus 2 log(factor) at every step: the DDPM noise-schedule shift for
    an image `factor` times larger per side (more pixels carry the same signal, so it takes more noise to destroy;
    PAPER.md section 3, our reading). factor 1 returns the same betas."""
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    log_snr = np.log(alphas_cumprod) - np.log1p(-alphas_cumprod) - 2.0 * math.log(factor)
    shifted = 1.0 / (1.0 + np.exp(-log_snr))
    return np.clip(1.0 - shifted / np.append(1.0, shifted[:-1]), 0.0, 0.999)


def resolution_factor(diffusion_cfg, resolution: int) -> float:
    """Side ratio of the training resolution to diffusion.shift_base_resolution (1 when no base is set)."""
    base = diffusion_cfg.shift_base_resolution
    return 1.0 if not base else resolution / base


def flow_shift(cfg) -> float:
    """The flow time shift in use: diffusion.time_shift times the resolution factor (SD3's a = sqrt(tokens / base
    tokens), which is the side ratio for a fixed patch size and aspect)."""
    return cfg.diffusion.time_shift * resolution_factor(cfg.diffusion, cfg.data.resolution)


def shift_time(t: torch.Tensor | float, shift: float):
    """SD3's resolution shift of flow time: t' = a t / (1 + (a - 1) t); a = 1 is the identity."""
    return shift * t / (1 + (shift - 1) * t)
