"""Classifier-free guidance: u + s (c - u) on the noise channels, the learned variance from the conditional half."""

import math

import pytest
import torch

from ldmkit.conditioning.cond import Cond
from ldmkit.diffusion.guidance import Guidance, guided


class Recorder(torch.nn.Module):
    """Output depends on the class (or the null class) and on x, and records the calls."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, cond):
        self.calls.append(cond)
        label = (
            torch.where(cond.drop_semantic, torch.full_like(cond.class_labels, -5), cond.class_labels)
            if cond.drop_semantic is not None
            else cond.class_labels
        )
        eps = x + label.view(-1, 1, 1, 1).float()
        var = x * 0 + 10 * label.view(-1, 1, 1, 1).float()
        return torch.cat([eps, var], 1)


def test_guidance_formula_and_variance_from_conditional_half():
    model = Recorder()
    x, t = torch.randn(2, 1, 2, 2), torch.rand(2)
    cond = Cond(class_labels=torch.tensor([3, 7]))
    out = guided(model, cond, Guidance(4.0, channels=1))(x, t)
    c_eps, u_eps = x + torch.tensor([3.0, 7.0]).view(-1, 1, 1, 1), x - 5
    assert torch.allclose(out[:, :1], u_eps + 4.0 * (c_eps - u_eps))
    assert torch.allclose(out[:, 1:], torch.tensor([30.0, 70.0]).view(-1, 1, 1, 1).expand(2, 1, 2, 2))
    (both,) = model.calls  # one batched evaluation of [conditional; unconditional]
    assert both.drop_semantic.tolist() == [False, False, True, True]
    assert both.class_labels.tolist() == [3, 7, 3, 7]


def test_scale_one_is_the_conditional_model_alone():
    model = Recorder()
    x, t = torch.randn(2, 1, 2, 2), torch.rand(2)
    cond = Cond(class_labels=torch.tensor([1, 2]))
    assert torch.equal(guided(model, cond, Guidance(1.0, channels=1))(x, t), model(x, t, cond))
    assert len(model.calls) == 2
    assert model.calls[0].batch_size == 2


def test_control_guidance_formula_and_plain_cfg_at_control_scale_one():
    """A toy model whose output is 1 + 2*[semantic kept] + 5*[control kept]: the three-evaluation formula picks
    the right branches, and control scale 1 is plain CFG with the control kept in both branches."""

    def toy(x, t, cond):
        sem = (~cond.drop_semantic).float() if cond.drop_semantic is not None else torch.ones(len(x))
        ctrl = (~cond.drop_control).float() if cond.drop_control is not None else torch.ones(len(x))
        return (1 + 2 * sem + 5 * ctrl)[:, None, None, None] * torch.ones_like(x)

    x, t = torch.zeros(2, 1, 2, 2), torch.rand(2)
    cond = Cond(class_labels=torch.tensor([1, 2]), control={"flip": torch.zeros(2, 1)})
    u, c_sem, c_full = 1.0, 3.0, 8.0
    out = guided(toy, cond, Guidance(3.0, control_scale=2.0))(x, t)
    assert torch.allclose(out, torch.full_like(x, u + 3.0 * (c_sem - u) + 2.0 * (c_full - c_sem)))
    plain = guided(toy, cond, Guidance(3.0))(x, t)
    assert torch.allclose(plain, torch.full_like(x, 6.0 + 3.0 * (8.0 - 6.0)))  # u' = control kept, no semantic: 6


def test_a_negative_condition_takes_the_place_of_the_null_one():
    def model(x, t, cond):  # the "prediction" is the class id, or -1 for the null class
        ids = (
            torch.where(cond.drop_semantic, -1, cond.class_labels)
            if cond.drop_semantic is not None
            else cond.class_labels
        )
        return ids.float().view(-1, 1, 1, 1).expand_as(x)

    x, t = torch.zeros(2, 1, 2, 2), torch.zeros(2)
    cond = Cond(class_labels=torch.tensor([3, 4]))
    plain = guided(model, cond, Guidance(2.0))(x, t)  # u + 2 (c - u) with u = -1
    assert plain[:, 0, 0, 0].tolist() == [7.0, 9.0]
    negative = Cond(class_labels=torch.tensor([1, 1]))
    assert guided(model, cond, Guidance(2.0), negative)(x, t)[:, 0, 0, 0].tolist() == [5.0, 7.0]  # u = 1


def test_a_negative_condition_with_control_guidance_drops_only_its_control():
    def toy(x, t, cond):  # class id (or -1 dropped) + 100 * [control kept]
        ids = (
            torch.where(cond.drop_semantic, -1, cond.class_labels)
            if cond.drop_semantic is not None
            else cond.class_labels
        )
        ctrl = (~cond.drop_control).float() if cond.drop_control is not None else torch.ones(len(x))
        return (ids.float() + 100 * ctrl).view(-1, 1, 1, 1).expand_as(x)

    x, t = torch.zeros(2, 1, 2, 2), torch.zeros(2)
    cond = Cond(class_labels=torch.tensor([3, 4]), control={"flip": torch.zeros(2, 1)})
    negative = Cond(class_labels=torch.tensor([1, 1]), control={"flip": torch.zeros(2, 1)})
    out = guided(toy, cond, Guidance(2.0, control_scale=3.0), negative)(x, t)
    u, c_sem, c_full = torch.tensor([1.0, 1.0]), torch.tensor([3.0, 4.0]), torch.tensor([103.0, 104.0])
    assert out[:, 0, 0, 0].tolist() == (u + 2 * (c_sem - u) + 3 * (c_full - c_sem)).tolist()


def linear_model(x, t, cond):
    """c = x + label, u = x - 5 (null class): any guidance formula shows in the output."""
    label = cond.class_labels.float()
    if cond.drop_semantic is not None:
        label = torch.where(cond.drop_semantic, -5.0, label)
    return x + label.view(-1, 1, 1, 1)


@pytest.mark.parametrize("t_step", [999, 750, 500, 100, 0])
def test_power_cosine_scale_equals_mdt_v2s_formula(t_step):
    """MDT-v2's forward_with_cfg: scale_step = (1 - cos(((1 - t / 1000) ** scale_pow) pi)) / 2, real scale =
    (cfg - 1) scale_step + 1, with t its (original) timestep; ldmkit's model time is t / 1000."""
    g = Guidance(3.8, schedule="power_cosine", exponent=4.0)
    step = (1 - math.cos(((1 - t_step / 1000) ** 4.0) * math.pi)) / 2
    assert g.scale_at(t_step / 1000) == pytest.approx((3.8 - 1) * step + 1, abs=1e-12)
    x, t = torch.randn(2, 1, 2, 2), torch.full((2,), t_step / 1000)
    cond = Cond(class_labels=torch.tensor([3, 7]))
    c, u = linear_model(x, t, cond), x - 5
    assert torch.allclose(guided(linear_model, cond, g)(x, t), u + g.scale_at(t_step / 1000) * (c - u))
    assert Guidance(3.0, schedule="linear").scale_at(t_step / 1000) == pytest.approx(1 + 2.0 * (1 - t_step / 1000))


def test_guidance_interval_guides_inside_only_and_equals_plain_cfg_there():
    from ldmkit.diffusion.objectives import DDPMObjective
    from ldmkit.diffusion.schedules import DDPMSchedule, ddpm_betas

    objective = DDPMObjective(DDPMSchedule(ddpm_betas("linear", 1000)))
    g = Guidance(4.0, interval=(0.28, 5.42), noise_to_signal=objective.noise_to_signal)
    cond = Cond(class_labels=torch.tensor([3, 7]))
    x = torch.randn(2, 1, 2, 2)
    for step in (0, 100, 400, 700, 999):
        t = torch.full((2,), step / 1000)
        sigma = objective.noise_to_signal(step / 1000)
        alpha_bar = float(objective.schedule.alphas_cumprod[step])
        assert sigma == pytest.approx(((1 - alpha_bar) / alpha_bar) ** 0.5)
        model = Recorder()
        out = guided(model, cond, g)(x, t)
        plain = guided(Recorder(), cond, Guidance(4.0))(x, t)
        if 0.28 < sigma <= 5.42:
            assert torch.equal(out, plain)
        else:
            assert torch.equal(out, model(x, t, cond))
            assert model.calls[0].batch_size == 2  # outside the interval: the conditional half only
    in_t = Guidance(4.0, interval=(0.2, 0.6), interval_space="t")
    assert [in_t.scale_at(t) for t in (0.1, 0.2, 0.5, 0.6, 0.9)] == [1.0, 1.0, 4.0, 4.0, 1.0]


def test_three_guided_channels_equal_dits_forward_with_cfg():
    """DiT's sample.py: eps, rest = out[:, :3], out[:, 3:]; half_eps = u + s (c - u); the 4th channel and the
    variance come from the conditional half."""
    model = Recorder()
    x, t = torch.randn(2, 4, 2, 2), torch.rand(2)
    cond = Cond(class_labels=torch.tensor([3, 7]))
    out = guided(model, cond, Guidance(1.5, channels=3))(x, t)
    both = model(torch.cat([x, x]), torch.cat([t, t]), Cond.cat([cond, cond.map(lambda v: v)]))
    c = Recorder()(x, t, cond)
    u = Recorder()(x, t, Cond(class_labels=cond.class_labels, drop_semantic=torch.ones(2, dtype=torch.bool)))
    assert both.shape[1] == 8
    assert torch.equal(out[:, :3], u[:, :3] + 1.5 * (c[:, :3] - u[:, :3]))
    assert torch.equal(out[:, 3:], c[:, 3:])


def test_skip_layer_guidance_follows_sd35s_reference_and_is_plain_cfg_when_off():
    """SD3.5's SkipLayerCFGDenoiser: scaled = u + w (c - u), then + slg (c - c_skip) at evaluations e with
    start * steps < e < end * steps, c_skip the conditional prediction with the listed joint blocks skipped."""
    from ldmkit.models.mmdit import MMDiT

    torch.manual_seed(0)
    model = MMDiT(
        input_size=4, in_channels=4, hidden_size=32, depth=4, num_heads=2, conditioning="class", num_classes=5
    )
    for p in model.parameters():  # adaLN-Zero starts every block as the identity: give the blocks an effect
        p.data.normal_(0, 0.2)
    model.eval()
    cond = Cond(class_labels=torch.tensor([1, 2]))
    x, t = torch.randn(2, 4, 4, 4), torch.full((2,), 0.5)
    steps, layers = 10, (1, 2)
    with torch.no_grad():
        c = model(x, t, cond)
        blocks = list(model.joint_blocks)
        model.joint_blocks = torch.nn.ModuleList([blocks[0], blocks[3]])  # by hand: blocks 1 and 2 left out
        c_skip = model(x, t, cond)
        model.joint_blocks = torch.nn.ModuleList(blocks)
        plain = guided(model, cond, Guidance(4.0, steps=steps))
        slg = guided(
            model, cond, Guidance(4.0, steps=steps, skip_layers=layers, skip_scale=2.5, skip_interval=(0.1, 0.5))
        )
        for evaluation in range(steps):
            expected = plain(x, t)
            if 1 < evaluation < 5:
                expected = expected + 2.5 * (c - c_skip)
            # the guided passes are batched, c and c_skip were not: float32 kernels chosen by batch size differ in
            # rounding, amplified by the large random weights (up to 5e-5 seen on outputs up to 16)
            assert torch.allclose(slg(x, t), expected, atol=2e-4), evaluation
        assert not torch.allclose(c, c_skip, atol=1e-3)  # the skipped blocks mattered
        assert torch.equal(model(x, t, cond), c)  # and are back in place
        off = guided(model, cond, Guidance(4.0, steps=steps, skip_layers=layers, skip_scale=0.0))
        assert all(torch.equal(off(x, t), plain(x, t)) for _ in range(steps))
        with pytest.raises(ValueError, match="block 9 does not exist"):
            guided(model, cond, Guidance(4.0, steps=steps, skip_layers=(9,), skip_scale=1.0, skip_interval=(0, 1)))(
                x, t
            )
