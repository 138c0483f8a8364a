"""Samplers. Every random draw comes from one generator per sample (seeded by the caller from the sample's
index), so a sample does not depend on which batch or process drew it.

DDPM objective: `ddpm` (ancestral, learned or fixed variance, respaced) and `ddim` (eta). Flow objective:
`euler` and `heun` over a shifted sigma grid from 1 to 0. The single-step functions are tested against
diffusers' DDPMScheduler, DDIMScheduler, FlowMatchEulerDiscreteScheduler and FlowMatchHeunDiscreteScheduler.
"""

from __future__ import annotations

import torch

from ..config import ConfigError, check_sampler
from .objectives import DDPMObjective
from .schedules import DDPMSchedule, flow_shift, shift_time, space_timesteps


def randn_per_sample(generators: list[torch.Generator], shape, device) -> torch.Tensor:
    """[len(generators), *shape] standard normal, row i drawn from generators[i] (on the CPU, so the
    numbers are the same on every device)."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


# ----------------------------------------------------------------------------------- DDPM / DDIM steps
def ddpm_step(objective: DDPMObjective, model_out, x, i: int, noise) -> torch.Tensor:
    """One ancestral step from chain position i to i-1 (no noise at i == 0)."""
    index = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
    mean, log_var, _, _ = objective.p_mean_variance(model_out.float(), x, index)
    if i == 0:
        return mean
    return mean + torch.exp(0.5 * log_var) * noise


def ddim_step(objective: DDPMObjective, model_out, x, i: int, eta: float = 0.0, noise=None) -> torch.Tensor:
    """One DDIM step from chain position i to i-1 (alpha_bar = 1 after the last)."""
    s, C = objective.schedule, x.shape[1]
    eps = model_out[:, :C].float()
    index = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
    _, _, x0, _ = objective.p_mean_variance(model_out.float(), x, index)
    alpha_bar, alpha_bar_prev = float(s.alphas_cumprod[i]), float(s.alphas_cumprod_prev[i])
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar)) ** 0.5 * (1 - alpha_bar / alpha_bar_prev) ** 0.5
    out = x0 * alpha_bar_prev**0.5 + (1 - alpha_bar_prev - sigma**2) ** 0.5 * eps
    if sigma > 0 and i > 0:
        out = out + sigma * noise
    return out


def sample_ddpm(
    model_fn,
    objective: DDPMObjective,
    x,
    generators,
    steps: int,
    respacing: str = "adm",
    method: str = "ddpm",
    eta: float = 0.0,
):
    """Run the respaced chain from pure noise x (position steps-1) to the data."""
    base = objective.schedule
    use = space_timesteps(base.num_steps, steps, respacing)
    chain = DDPMObjective(base.respace(use) if len(use) < base.num_steps else base, objective.learn_sigma)
    for i in reversed(range(chain.schedule.num_steps)):
        index = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        model_out = model_fn(x, chain.schedule.model_time(index))
        noise = randn_per_sample(generators, x.shape[1:], x.device) if i > 0 else None
        if method == "ddpm":
            x = ddpm_step(chain, model_out, x, i, noise)
        else:
            x = ddim_step(chain, model_out, x, i, eta, noise if eta > 0 else None)
    return x


# ----------------------------------------------------------------------------------- flow (Euler / Heun)
def flow_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """steps+1 noise levels from 1 to 0, evenly spaced then shifted (SD3)."""
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).float()


def euler_step(v, x, sigma: float, sigma_next: float) -> torch.Tensor:
    return x + (sigma_next - sigma) * v.float()


def sample_flow(model_fn, x, sigmas: torch.Tensor, method: str = "euler"):
    """Integrate dx/dsigma = v from sigmas[0] to sigmas[-1]. Heun corrects every step except the last one
    to sigma = 0 (as Karras et al. and diffusers' FlowMatchHeunDiscreteScheduler)."""
    B = x.shape[0]
    for k in range(len(sigmas) - 1):
        s, s_next = float(sigmas[k]), float(sigmas[k + 1])
        v = model_fn(x, torch.full((B,), s, device=x.device)).float()
        x_euler = euler_step(v, x, s, s_next)
        if method == "heun" and s_next > 0:
            v_next = model_fn(x_euler, torch.full((B,), s_next, device=x.device)).float()
            x = x + (s_next - s) * 0.5 * (v + v_next)
        else:
            x = x_euler
    return x


def sample(model_fn, cfg, objective, shape, generators, device, steps: int | None = None, sampler: str | None = None):
    """Draw len(generators) samples of `shape` (C, H, W) with the configured sampler."""
    sampler = sampler or cfg.sample.sampler
    steps = cfg.sample.steps if steps is None else steps
    check_sampler(cfg.diffusion.objective, sampler, "--sampler")
    if steps <= 0:
        raise ConfigError(f"sampling steps must be positive, got {steps}")
    x = randn_per_sample(generators, shape, device)
    if sampler in ("ddpm", "ddim"):
        return sample_ddpm(model_fn, objective, x, generators, steps, cfg.sample.respacing, sampler)
    return sample_flow(model_fn, x, flow_sigmas(steps, flow_shift(cfg)).to(device), sampler)


__all__ = [
    "DDPMSchedule",
    "sample",
    "sample_ddpm",
    "sample_flow",
    "flow_sigmas",
    "ddpm_step",
    "ddim_step",
    "euler_step",
    "randn_per_sample",
]
