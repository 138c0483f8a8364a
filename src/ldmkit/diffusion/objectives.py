"""Training objectives. Each maps its own time variable onto the contract's t in [0, 1] and returns a
per-sample loss [B]; which samples, times and noise are used is decided by the caller's generator.
"""

from __future__ import annotations

import functools
import math

import torch

from .schedules import DDPMSchedule, ddpm_betas, flow_shift, resolution_factor, shift_log_snr, shift_time


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of data in [-1, 1] quantised to 256 bins under a Gaussian (ADM's decoder term)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12)))
    )


class DDPMObjective:
    """Epsilon prediction; with learn_sigma, Improved DDPM's learned-range variance and the hybrid loss
    L = L_simple + L_vlb, the variational term computed on a stopped-gradient mean (DiT's recipe)."""

    def __init__(self, schedule: DDPMSchedule, learn_sigma: bool = True, min_snr_gamma: float | None = None):
        self.schedule = schedule
        self.learn_sigma = learn_sigma
        self.min_snr_gamma = min_snr_gamma

    @classmethod
    def from_config(cls, diffusion_cfg, learn_sigma: bool, resolution_factor: float = 1.0) -> "DDPMObjective":
        betas = ddpm_betas(
            diffusion_cfg.beta_schedule, diffusion_cfg.num_timesteps, diffusion_cfg.beta_start, diffusion_cfg.beta_end
        )
        if resolution_factor != 1.0:  # log-SNR shifted for the resolution (diffusion.shift_base_resolution)
            betas = shift_log_snr(betas, resolution_factor)
        return cls(DDPMSchedule(betas), learn_sigma, diffusion_cfg.min_snr_gamma)

    def sample_time(self, n: int, generator: torch.Generator, device) -> torch.Tensor:
        return torch.randint(0, self.schedule.num_steps, (n,), generator=generator, device=device)

    def noise_to_signal(self, t: float) -> float:
        """EDM's sigma, sqrt((1 - alpha_bar) / alpha_bar), at model time t (training step / num_train_timesteps)."""
        s = self.schedule
        alpha_bar = float(s.alphas_cumprod[min(round(t * s.num_train_timesteps), s.num_steps - 1)])
        return ((1 - alpha_bar) / alpha_bar) ** 0.5

    def q_sample(self, x0, index, noise):
        s = self.schedule
        return (
            s.gather("sqrt_alphas_cumprod", index, x0.ndim) * x0
            + s.gather("sqrt_one_minus_alphas_cumprod", index, x0.ndim) * noise
        )

    def q_posterior(self, x0, x_t, index):
        s = self.schedule
        mean = (
            s.gather("posterior_mean_coef1", index, x0.ndim) * x0
            + s.gather("posterior_mean_coef2", index, x0.ndim) * x_t
        )
        return mean, s.gather("posterior_log_variance_clipped", index, x0.ndim)

    def p_mean_variance(self, model_out, x_t, index):
        """Mean, log-variance and x0 estimate of p(x_{t-1} | x_t) from the model output."""
        s, C = self.schedule, x_t.shape[1]
        if self.learn_sigma:
            eps, var_values = model_out[:, :C], model_out[:, C:]
            min_log = s.gather("posterior_log_variance_clipped", index, x_t.ndim)
            max_log = s.gather("log_betas", index, x_t.ndim)
            frac = (var_values + 1) / 2  # the model outputs [-1, 1] -> interpolation weight
            log_variance = frac * max_log + (1 - frac) * min_log
        else:
            eps = model_out
            log_variance = s.gather("log_variance_fixed_large", index, x_t.ndim)
        x0 = (
            s.gather("sqrt_recip_alphas_cumprod", index, x_t.ndim) * x_t
            - s.gather("sqrt_recipm1_alphas_cumprod", index, x_t.ndim) * eps
        )
        mean, _ = self.q_posterior(x0, x_t, index)
        return mean, log_variance, x0, eps

    def loss(self, model, x0: torch.Tensor, cond, index: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        x_t = self.q_sample(x0, index, noise)
        out = model(x_t, self.schedule.model_time(index), cond)
        C = x0.shape[1]
        terms = {"mse": mean_flat((noise - out[:, :C].float()) ** 2)}
        if self.min_snr_gamma is not None:
            # Min-SNR weighting for epsilon prediction (Hang et al. 2023; MDT-v2): min(SNR, gamma) / SNR.
            alpha_bar = self.schedule.gather("alphas_cumprod", index, 1)
            snr = alpha_bar / (1 - alpha_bar)
            terms["mse"] = terms["mse"] * torch.clamp(snr, max=self.min_snr_gamma) / snr
        if self.learn_sigma:
            # The variational bound trains only the variance: the mean's gradient comes from the mse term.
            frozen = torch.cat([out[:, :C].detach(), out[:, C:]], dim=1).float()
            true_mean, true_log_var = self.q_posterior(x0, x_t, index)
            mean, log_var, _, _ = self.p_mean_variance(frozen, x_t, index)
            kl = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
            nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
            terms["vb"] = torch.where(index == 0, nll, kl)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms


class FlowObjective:
    """Rectified flow (SD3): x_t = (1 - t) x0 + t eps, the model predicts v = eps - x0."""

    def __init__(
        self, time_sampler: str = "uniform", logit_mean: float = 0.0, logit_std: float = 1.0, time_shift: float = 1.0
    ):
        self.time_sampler = time_sampler
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.time_shift = time_shift

    @classmethod
    def from_config(cls, diffusion_cfg, time_shift: float | None = None) -> "FlowObjective":
        shift = diffusion_cfg.time_shift if time_shift is None else time_shift
        return cls(diffusion_cfg.time_sampler, diffusion_cfg.logit_mean, diffusion_cfg.logit_std, shift)

    def sample_time(self, n: int, generator: torch.Generator, device) -> torch.Tensor:
        if self.time_sampler == "logit_normal":
            t = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, generator=generator, device=device))
        else:
            t = torch.rand(n, generator=generator, device=device)
        return shift_time(t, self.time_shift)

    def noise_to_signal(self, t: float) -> float:
        """EDM's sigma at flow time t: t / (1 - t) (infinite at pure noise)."""
        return t / (1 - t) if t < 1 else float("inf")

    def loss(self, model, x0: torch.Tensor, cond, t: torch.Tensor, noise: torch.Tensor) -> dict[str, torch.Tensor]:
        t_ = t.reshape(-1, *([1] * (x0.ndim - 1)))
        x_t = (1 - t_) * x0 + t_ * noise
        out = model(x_t, t, cond)
        mse = mean_flat((noise - x0 - out.float()) ** 2)
        return {"mse": mse, "loss": mse}


def training_loss(
    objective, model, x0: torch.Tensor, cond, t: torch.Tensor, noise: torch.Tensor, extra_passes: tuple[dict, ...] = ()
) -> dict[str, torch.Tensor]:
    """The objective's loss, plus one more per extra pass: the same noisy latents through the model called with
    that pass's arguments (MDT-v2's masked pass: keep=...); the losses add."""
    terms = objective.loss(model, x0, cond, t, noise)
    for kwargs in extra_passes:
        extra = objective.loss(functools.partial(model, **kwargs), x0, cond, t, noise)
        terms = {k: terms[k] + extra[k] for k in ("loss", "mse")}
    return terms


def build_objective(cfg):
    if cfg.diffusion.objective == "ddpm":
        return DDPMObjective.from_config(
            cfg.diffusion, cfg.model.learn_sigma, resolution_factor(cfg.diffusion, cfg.data.resolution)
        )
    return FlowObjective.from_config(cfg.diffusion, flow_shift(cfg))
