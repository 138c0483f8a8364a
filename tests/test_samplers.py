"""Each sampler step against the matching diffusers scheduler on the same inputs."""

import numpy as np
import pytest
import torch
from conftest import tiny_config
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

from ldmkit.diffusion import samplers
from ldmkit.diffusion.objectives import DDPMObjective
from ldmkit.diffusion.schedules import DDPMSchedule, ddpm_betas, shift_time, space_timesteps


def objective(learn_sigma=True):
    return DDPMObjective(DDPMSchedule(ddpm_betas("linear", 1000)), learn_sigma)


def test_adm_respacing_matches_dit_and_diffusers_linspace():
    use = space_timesteps(1000, 250, "adm")
    assert len(use) == 250
    assert use[0] == 0
    assert use[-1] == 999
    sched = DDPMScheduler(num_train_timesteps=1000, timestep_spacing="linspace")
    sched.set_timesteps(250)
    assert sorted(sched.timesteps.tolist()) == use
    respaced = DDPMSchedule(ddpm_betas("linear", 1000)).respace(use)
    # alphas_cumprod at the kept steps is unchanged by respacing
    assert np.allclose(respaced.alphas_cumprod, DDPMSchedule(ddpm_betas("linear", 1000)).alphas_cumprod[use])


@pytest.mark.parametrize("position", [249, 120, 1])
def test_ddpm_learned_range_step_matches_diffusers(position):
    obj = objective(True)
    use = space_timesteps(1000, 250, "adm")
    chain = DDPMObjective(obj.schedule.respace(use), True)
    ref = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        variance_type="learned_range",
        clip_sample=False,
        timestep_spacing="linspace",
    )
    ref.set_timesteps(250)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 8, 8, 8, generator=g)
    out[:, 4:] = out[:, 4:].clamp(-1, 1)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    expected = ref.step(out, use[position], x, generator=torch.Generator().manual_seed(7)).prev_sample
    got = samplers.ddpm_step(chain, out, x, position, noise)
    assert (got - expected).abs().max() < 1e-4


@pytest.mark.parametrize("position", [9, 4, 0])
def test_ddim_step_matches_diffusers(position):
    obj = objective(False)
    use = space_timesteps(1000, 10, "leading")
    chain = DDPMObjective(obj.schedule.respace(use), False)
    ref = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing="leading",
    )
    ref.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    expected = ref.step(eps, use[position], x, eta=0.0).prev_sample
    got = samplers.ddim_step(chain, eps, x, position)
    assert (got - expected).abs().max() < 1e-4
    if position > 0:  # sample.eta 1: the same fresh noise gives the same step
        noise = torch.randn(2, 4, 8, 8, generator=g)
        expected = ref.step(eps, use[position], x, eta=1.0, variance_noise=noise).prev_sample
        assert (samplers.ddim_step(chain, eps, x, position, eta=1.0, noise=noise) - expected).abs().max() < 1e-4


def test_euler_flow_step_and_shift_match_diffusers():
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ref.set_timesteps(20)
    sig = ref.sigmas
    # diffusers' grid stops at its sigma_min; the shift formula is the same
    assert torch.allclose(shift_time(torch.tensor(0.5), 3.0), torch.tensor(0.75))
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for k in (0, 7, 19):
        ref._step_index = k
        expected = ref.step(v, ref.timesteps[k], x).prev_sample
        got = samplers.euler_step(v, x, float(sig[k]), float(sig[k + 1]))
        assert (got - expected).abs().max() < 1e-5


def test_heun_flow_matches_diffusers_on_linear_velocity_field():
    """A whole Heun integration against FlowMatchHeunDiscreteScheduler, same sigma grid, same model."""
    ref = FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    ref.set_timesteps(6)
    A = torch.tensor(0.7)

    def model_fn(x, t):  # a velocity field that depends on x and t, so Heun's correction matters
        return A * x + t.view(-1, 1, 1, 1)

    x0 = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    x = x0.clone()
    for t in ref.timesteps:
        x = ref.step(model_fn(x, torch.full((2,), float(t) / 1000)), t, x).prev_sample
    grid = torch.cat([ref.sigmas[::2], torch.zeros(1)])  # the distinct sigmas in order, then 0
    ours = samplers.sample_flow(model_fn, x0.clone(), grid, "heun")
    assert (ours - x).abs().max() < 1e-4


def test_per_sample_noise_is_batch_independent():
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    a = samplers.randn_per_sample(gens, (1, 4, 4), "cpu")
    b = samplers.randn_per_sample([torch.Generator().manual_seed(6)], (1, 4, 4), "cpu")
    assert torch.equal(a[1], b[0])


def toy_output(x, t):
    """A smooth stand-in for a denoiser: output depends on the input and on t in [0, 1]."""
    return x * (0.3 + 0.5 * t.reshape(-1, 1, 1, 1)) + 0.1 * torch.sin(3 * x)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("spacing,steps", [("linspace", 10), ("leading", 20), ("trailing", 7)])
def test_dpm_solver_pp_matches_diffusers_on_a_ddpm_model(order, spacing, steps):
    from diffusers import DPMSolverMultistepScheduler

    cfg = tiny_config(
        "sample.sampler=dpmpp", f"sample.solver_order={order}", f"sample.respacing={spacing}", "model.learn_sigma=false"
    )
    betas = ddpm_betas("linear", 1000)
    scheduler = DPMSolverMultistepScheduler(
        trained_betas=betas.tolist(), solver_order=order, timestep_spacing=spacing, algorithm_type="dpmsolver++"
    )
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == samplers.dpm_timesteps(1000, steps, spacing)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    for t in scheduler.timesteps:
        y = scheduler.step(toy_output(y, t.float().reshape(1) / 1000), t, y).prev_sample
    ours = samplers.sample_dpmpp(toy_output, DDPMObjective(DDPMSchedule(betas), False), x, steps, cfg, order)
    # 1e-5 of the samples' scale (they reach about 12 here): diffusers keeps its coefficients in float32
    assert (ours - y).abs().max() <= 1e-5 * max(1.0, float(y.abs().max()))


@pytest.mark.parametrize("order", [2, 3])
def test_dpm_solver_pp_matches_diffusers_on_a_flow_model(order):
    """The shifted flow grid equals diffusers' (use_flow_sigmas) and the whole chain its DPMSolverMultistepScheduler."""
    from diffusers import DPMSolverMultistepScheduler

    scheduler = DPMSolverMultistepScheduler(
        solver_order=order, use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"
    )
    scheduler.set_timesteps(12)
    sigmas = samplers.dpm_flow_sigmas(12, 3.0)
    assert np.allclose(scheduler.sigmas.numpy(), np.array(sigmas, dtype=np.float32), rtol=0, atol=0)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    y = x.clone()
    for i, t in enumerate(scheduler.timesteps):  # the model sees the level itself, as ldmkit's flow models do
        y = scheduler.step(toy_output(y, torch.tensor([sigmas[i]])), t, y).prev_sample
    cfg = tiny_config(
        "diffusion.objective=flow", "model.learn_sigma=false", "sample.sampler=dpmpp", "diffusion.time_shift=3"
    )
    ours = samplers.sample_dpmpp(toy_output, None, x, 12, cfg, order)
    assert (ours - y).abs().max() <= 1e-5 * max(1.0, float(y.abs().max()))


def reference_sd3_sigmas(steps: int, shift: float) -> torch.Tensor:
    """SD3's sampling sigmas written out as its reference code computes them (ModelSamplingDiscreteFlow and
    SD3Inferencer.get_sigmas), one level at a time."""

    def sigma(timestep):
        timestep = timestep / 1000.0
        return timestep if shift == 1.0 else shift * timestep / (1 + (shift - 1) * timestep)

    table = sigma(torch.arange(1, 1000 + 1, 1))
    start, end = table[-1] * 1000, table[0] * 1000
    return torch.FloatTensor([sigma(ts) for ts in torch.linspace(start, end, steps)] + [0.0])


@pytest.mark.parametrize("steps,shift", [(28, 3.0), (50, 1.0), (40, 3.0), (4, 3.0)])
def test_sd3_sigma_schedule_equals_the_reference_and_diffusers(steps, shift):
    ours = samplers.sd3_sigmas(steps, shift)
    assert torch.equal(ours, reference_sd3_sigmas(steps, shift))
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ref.set_timesteps(steps)
    assert (ours - ref.sigmas).abs().max() <= 1e-6  # diffusers builds the same grid in float64, then float32
    if (steps, shift) == (28, 3.0):  # the uniform grid differs by up to 0.09 near the data
        gap = (ours - samplers.flow_sigmas(28, 3.0)).abs().max()
        assert 0.08 < gap < 0.1


def test_sd3_schedule_samples_as_diffusers_flow_match_euler_and_k_diffusion_dpmpp_2m():
    cfg = tiny_config(
        "diffusion.objective=flow",
        "model.learn_sigma=false",
        "diffusion.time_shift=3",
        "sample.sigma_schedule=sd3",
        "sample.sampler=euler",
    )
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    ref.set_timesteps(10)
    y = x.clone()
    for k, t in enumerate(ref.timesteps):
        y = ref.step(toy_output(y, ref.sigmas[k].reshape(1)), t, y).prev_sample
    ours = samplers.sample(toy_output, cfg, None, (4, 8, 8), [torch.Generator().manual_seed(4)] * 2, "cpu", 10, "euler")
    assert (ours - y).abs().max() <= 1e-5
    # k-diffusion's sample_dpmpp_2m (SD3.5's reference sampler) with the reference's CONST denoiser x - sigma v
    sigmas = reference_sd3_sigmas(10, 3.0).double()
    z, old = x.double(), None
    for i in range(10):
        denoised = z - sigmas[i] * toy_output(z.float(), sigmas[i].float().reshape(1)).double()
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old is None or sigmas[i + 1] == 0:
            z = (sigmas[i + 1] / sigmas[i]) * z - (-h).expm1() * denoised
        else:
            r = (t - (-sigmas[i - 1].log())) / h
            z = (sigmas[i + 1] / sigmas[i]) * z - (-h).expm1() * ((1 + 1 / (2 * r)) * denoised - old / (2 * r))
        old = denoised
    ours = samplers.sample_dpmpp(toy_output, None, x.clone(), 10, cfg, 2)
    assert (ours.double() - z).abs().max() <= 1e-5


def test_sd3_sigma_schedule_is_refused_for_ddpm_models():
    from ldmkit.config import ConfigError

    with pytest.raises(ConfigError, match="sample.sigma_schedule"):
        tiny_config("sample.sigma_schedule=sd3")


def test_an_export_with_the_sd3_schedule_needs_no_sigmas_in_diffusers():
    """diffusers' FlowMatchEulerDiscreteScheduler builds SD3's table by default: the exported scheduler follows
    ldmkit's Euler chain without ldmkit_sigmas; the k-diffusion DPM-Solver++ form is exported as Euler, with a note."""
    from ldmkit.transfer.pipeline import diffusers_scheduler, sampler_gap

    flow = ["diffusion.objective=flow", "model.learn_sigma=false", "diffusion.time_shift=3", "sample.steps=12"]
    cfg = tiny_config(*flow, "sample.sampler=euler", "sample.sigma_schedule=sd3")
    scheduler, notes = diffusers_scheduler(cfg, False)
    assert notes == []
    assert sampler_gap(cfg, scheduler, False) <= 1e-5
    cfg = tiny_config(*flow, "sample.sampler=dpmpp", "sample.sigma_schedule=sd3")
    scheduler, notes = diffusers_scheduler(cfg, False)
    assert type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert "k-diffusion" in notes[0]
