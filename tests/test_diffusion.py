import math

import numpy as np
import torch

from ldmkit.conditioning.cond import Cond
from ldmkit.diffusion.objectives import DDPMObjective, FlowObjective, normal_kl
from ldmkit.diffusion.schedules import DDPMSchedule, ddpm_betas, shift_time, space_timesteps


class Oracle(torch.nn.Module):
    """Returns the exact target, so the simple loss must be zero."""

    def __init__(self, target, extra=None):
        super().__init__()
        self.target, self.extra = target, extra

    def forward(self, x, t, cond):
        return self.target if self.extra is None else torch.cat([self.target, self.extra], 1)


def test_ddpm_linear_schedule_is_dits():
    betas = ddpm_betas("linear", 1000)
    assert betas[0] == 1e-4
    assert abs(betas[-1] - 0.02) < 1e-12
    assert len(betas) == 1000
    s = DDPMSchedule(betas)
    assert abs(s.alphas_cumprod[-1] - 4.036e-5) < 1e-7  # the terminal signal level of DiT's schedule


def test_ddpm_loss_zero_for_perfect_noise_prediction():
    obj = DDPMObjective(DDPMSchedule(ddpm_betas("linear", 1000)), learn_sigma=True)
    x0, noise = torch.rand(4, 2, 4, 4) * 2 - 1, torch.randn(4, 2, 4, 4)
    t = torch.tensor([0, 10, 500, 999])
    terms = obj.loss(Oracle(noise, torch.zeros(4, 2, 4, 4)), x0, Cond(), t, noise)
    assert terms["mse"].abs().max() < 1e-10
    # t > 0: with the exact epsilon the posterior means agree, so the KL is only the variance mismatch (>= 0)
    assert (terms["vb"][1:] >= 0).all()
    assert terms["vb"][0] > 0  # t = 0: the discretised decoder NLL, in bits


def test_vb_term_matches_closed_form_kl():
    obj = DDPMObjective(DDPMSchedule(ddpm_betas("linear", 1000)), learn_sigma=True)
    x0, noise = torch.zeros(1, 1, 1, 1), torch.randn(1, 1, 1, 1)
    t = torch.tensor([300])
    v = torch.full((1, 1, 1, 1), 1.0)  # frac = 1: the model variance is beta_t
    terms = obj.loss(Oracle(noise, v), x0, Cond(), t, noise)
    s = obj.schedule
    expected = (
        0.5
        * (
            -1
            + math.log(s.betas[300])
            - s.posterior_log_variance_clipped[300]
            + math.exp(s.posterior_log_variance_clipped[300] - math.log(s.betas[300]))
        )
        / math.log(2)
    )
    assert abs(terms["vb"].item() - expected) < 1e-5


def test_flow_loss_and_time_sampling():
    obj = FlowObjective("logit_normal", 0.0, 1.0, time_shift=3.0)
    t = obj.sample_time(10_000, torch.Generator().manual_seed(0), "cpu")
    assert 0 < t.min()
    assert t.max() < 1
    assert t.median() > 0.6  # shifted towards noise
    x0, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    assert obj.loss(Oracle(noise - x0), x0, Cond(), torch.rand(3), noise)["loss"].abs().max() < 1e-10
    assert float(shift_time(torch.tensor(0.0), 3.0)) == 0
    assert float(shift_time(torch.tensor(1.0), 3.0)) == 1


def test_cosine_schedule():
    betas = ddpm_betas("cosine", 1000)
    assert betas.max() <= 0.999
    assert (np.diff(betas) >= -1e-12).all()
    assert (
        abs(
            DDPMSchedule(betas).alphas_cumprod[499]
            - np.cos((0.5 + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(0.008 / 1.008 * np.pi / 2) ** 2
        )
        < 1e-3
    )


def test_respacing_modes():
    assert space_timesteps(1000, 4, "leading") == [0, 250, 500, 750]
    assert space_timesteps(1000, 4, "trailing") == [249, 499, 749, 999]
    assert space_timesteps(1000, 1000, "adm") == list(range(1000))


def test_normal_kl_is_zero_for_equal_gaussians():
    m, lv = torch.randn(5), torch.randn(5)
    assert normal_kl(m, lv, m, lv).abs().max() < 1e-6


def test_scaled_linear_betas_match_diffusers():
    from diffusers import DDPMScheduler

    from ldmkit.diffusion.schedules import ddpm_betas

    ref = (
        DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195, num_train_timesteps=1000)
        .betas.double()
        .numpy()
    )
    assert np.allclose(ddpm_betas("scaled_linear", 1000, 0.0015, 0.0195), ref, rtol=1e-6, atol=0)


def test_min_snr_weighting():
    """min(SNR, 5) / SNR: 1 at the noisy end (SNR < 5), below 1 where the image dominates."""
    schedule = DDPMSchedule(ddpm_betas("linear", 1000))
    plain, weighted = (
        DDPMObjective(schedule, learn_sigma=False),
        DDPMObjective(schedule, learn_sigma=False, min_snr_gamma=5.0),
    )
    zero = lambda x, t, c: torch.zeros_like(x)  # noqa: E731  a model predicting 0: the loss is mean(noise^2)
    x0, noise = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    index = torch.tensor([10, 900])
    a, b = plain.loss(zero, x0, Cond(), index, noise)["loss"], weighted.loss(zero, x0, Cond(), index, noise)["loss"]
    alpha_bar = torch.from_numpy(schedule.alphas_cumprod[[10, 900]]).float()
    snr = alpha_bar / (1 - alpha_bar)
    assert snr[0] > 5 > snr[1]
    assert torch.allclose(b, a * torch.clamp(snr, max=5) / snr)
    assert torch.allclose(b[1], a[1])
