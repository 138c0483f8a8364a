"""Samplers. Every random draw comes from one generator per sample (seeded by the caller from the sample's
index), so a sample does not depend on which batch or process drew it.

DDPM objective: `ddpm` (ancestral, learned or fixed variance, respaced) and `ddim` (eta). Flow objective:
`euler` and `heun` over noise levels from 1 to 0 (evenly spaced then shifted, or SD3's discrete table). Both:
`dpmpp`, multistep DPM-Solver++ of order sample.solver_order. The step functions are tested against diffusers'
DDPMScheduler, DDIMScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler and
DPMSolverMultistepScheduler.
"""

from __future__ import annotations

import math

import numpy as np
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


def sd3_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """SD3's sampling noise levels (steps + 1, the last 0), in float32 as its reference computes them: the model's
    table holds sigma(i) = shift(i / 1000) for i = 1..1000; get_sigmas spaces `steps` timesteps evenly from
    1000 sigma_max to 1000 sigma_min and maps each through sigma() again (so the smallest level is shifted twice).
    diffusers' FlowMatchEulerDiscreteScheduler builds the same grid by default."""

    def sigma(timestep: torch.Tensor) -> torch.Tensor:
        t = timestep / 1000.0
        return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)

    table = sigma(torch.arange(1, 1001))  # float32, as ModelSamplingDiscreteFlow's buffer
    timesteps = torch.linspace(float(table[-1] * 1000), float(table[0] * 1000), steps)
    return torch.cat([sigma(timesteps), torch.zeros(1)])


def noise_levels(cfg, steps: int) -> torch.Tensor:
    """The flow sampler's steps + 1 noise levels for sample.sigma_schedule."""
    if cfg.sample.sigma_schedule == "sd3":
        return sd3_sigmas(steps, flow_shift(cfg))
    return flow_sigmas(steps, flow_shift(cfg))


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


# ----------------------------------------------------------------------------------- DPM-Solver++ (multistep)
def dpm_timesteps(num_timesteps: int, steps: int, spacing: str = "adm") -> list[int]:
    """The training steps DPM-Solver++ visits, descending, as diffusers' DPMSolverMultistepScheduler picks them:
    linspace (also for adm) drops the t = 0 end of steps + 1 evenly spaced points; leading and trailing as its
    timestep_spacing says."""
    T = num_timesteps
    if not 0 < steps <= T:
        raise ValueError(f"sampling steps must be in 1..{T}, got {steps}")
    if spacing in ("adm", "linspace"):
        chosen = np.linspace(0, T - 1, steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        chosen = (np.arange(0, steps + 1) * (T // (steps + 1))).round()[::-1][:-1]
    elif spacing == "trailing":
        chosen = np.arange(T, 0, -T / steps).round() - 1
    else:
        raise ValueError(f"unknown respacing {spacing!r}")
    return [int(t) for t in chosen]


def dpm_flow_sigmas(steps: int, shift: float = 1.0, num_timesteps: int = 1000) -> list[float]:
    """The noise levels DPM-Solver++ visits on a flow model, as diffusers' DPMSolverMultistepScheduler
    (use_flow_sigmas) builds them: steps evenly spaced levels from 1 - 1/num_timesteps down, shifted, then 0. (It
    cannot start at 1, where the signal scale 1 - sigma is 0 and its log-SNR step is infinite.)"""
    unshifted = 1.0 - np.linspace(1.0, 1.0 / num_timesteps, steps + 1)
    shifted = shift * unshifted / (1 + (shift - 1) * unshifted)
    return [float(v) for v in np.flip(shifted)[:-1]] + [0.0]


def dpm_solver_pp(denoise, x, alphas: list[float], sigmas: list[float], order: int = 2):
    """Multistep DPM-Solver++ (Lu et al., 2022) on a grid of signal scales alphas[i] and noise levels sigmas[i]
    (x = alpha x0 + sigma noise), from sigmas[0] to sigmas[-1] = 0. denoise(x, i) is the model's x0 estimate at grid
    point i. Orders 1-3 with diffusers' defaults: lower orders while the history fills, a first-order last step
    (to sigma 0), and a second-order step before it when there are fewer than 15 steps (lower_order_final)."""
    n = len(sigmas) - 1
    lam = [math.log(a) - math.log(s) if s > 0 else math.inf for a, s in zip(alphas, sigmas)]
    history: list[torch.Tensor] = []  # x0 estimates, newest last
    for i in range(n):
        history = (history + [denoise(x, i).float()])[-3:]
        o = min(order, len(history))
        if i == n - 1:
            o = 1
        elif i == n - 2 and n < 15:
            o = min(o, 2)
        a_t, s_t, s_s = alphas[i + 1], sigmas[i + 1], sigmas[i]
        h = lam[i + 1] - lam[i]
        phi = math.expm1(-h)  # e^-h - 1 (-1 at the last step, where h is infinite)
        m0 = history[-1]
        x = (s_t / s_s) * x - a_t * phi * m0
        if o >= 2:
            r0 = (lam[i] - lam[i - 1]) / h
            d1_0 = (m0 - history[-2]) / r0
            if o == 2:  # midpoint
                x = x - 0.5 * a_t * phi * d1_0
            else:
                r1 = (lam[i - 1] - lam[i - 2]) / h
                d1_1 = (history[-2] - history[-3]) / r1
                d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + a_t * (phi / h + 1.0) * d1 - a_t * ((phi + h) / h**2 - 0.5) * d2
    return x


def sample_dpmpp(model_fn, objective, x, steps: int, cfg, order: int = 2):
    """DPM-Solver++ for either objective: DDPM models (epsilon, learned variance ignored) over DPM's choice of
    training steps; flow models (v = noise - x0) over dpm_flow_sigmas (diffusers' DPMSolverMultistepScheduler), or
    with sample.sigma_schedule sd3 over sd3_sigmas with unit signal scale (k-diffusion's sample_dpmpp_2m at order 2,
    the sampler of SD3.5's reference code)."""
    C = x.shape[1]
    if cfg.diffusion.objective == "flow":
        if cfg.sample.sigma_schedule == "sd3":  # k-diffusion's form, as SD3.5's reference: x = x0 + sigma noise
            sigmas = [float(v) for v in sd3_sigmas(steps, flow_shift(cfg))]
            alphas = [1.0] * len(sigmas)
        else:  # diffusers' form: x = (1 - sigma) x0 + sigma noise
            sigmas = dpm_flow_sigmas(steps, flow_shift(cfg))
            alphas = [1.0 - s for s in sigmas]

        def denoise(x, i):
            t = torch.full((x.shape[0],), sigmas[i], device=x.device)
            return x - sigmas[i] * model_fn(x, t).float()
    else:
        base = objective.schedule
        visited = dpm_timesteps(base.num_steps, steps, cfg.sample.respacing)
        alphas_cumprod = [float(base.alphas_cumprod[t]) for t in visited]
        alphas = [math.sqrt(a) for a in alphas_cumprod] + [1.0]
        sigmas = [math.sqrt(1 - a) for a in alphas_cumprod] + [0.0]

        def denoise(x, i):
            t = torch.full((x.shape[0],), visited[i] / base.num_train_timesteps, device=x.device)
            eps = model_fn(x, t)[:, :C].float()
            return (x - sigmas[i] * eps) / alphas[i]

    return dpm_solver_pp(denoise, x, alphas, sigmas, order)


def sample(model_fn, cfg, objective, shape, generators, device, steps: int | None = None, sampler: str | None = None):
    """Draw len(generators) samples of `shape` (C, H, W) with the configured sampler."""
    sampler = sampler or cfg.sample.sampler
    steps = cfg.sample.steps if steps is None else steps
    check_sampler(cfg.diffusion.objective, sampler, "--sampler")
    if steps <= 0:
        raise ConfigError(f"sampling steps must be positive, got {steps}")
    x = randn_per_sample(generators, shape, device)
    if sampler == "dpmpp":
        return sample_dpmpp(model_fn, objective, x, steps, cfg, cfg.sample.solver_order)
    if sampler in ("ddpm", "ddim"):
        return sample_ddpm(model_fn, objective, x, generators, steps, cfg.sample.respacing, sampler, cfg.sample.eta)
    return sample_flow(model_fn, x, noise_levels(cfg, steps).to(device), sampler)


__all__ = [
    "DDPMSchedule",
    "sample",
    "sample_ddpm",
    "sample_flow",
    "sample_dpmpp",
    "dpm_solver_pp",
    "dpm_timesteps",
    "dpm_flow_sigmas",
    "flow_sigmas",
    "sd3_sigmas",
    "noise_levels",
    "ddpm_step",
    "ddim_step",
    "euler_step",
    "randn_per_sample",
]
