"""Classifier-free guidance: u + s (c - u) on the noise channels, the learned variance from the conditional half."""

import pytest
import torch

from ldmkit.conditioning.cond import Cond
from ldmkit.diffusion.guidance import guided


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
    out = guided(model, cond, 4.0, guided_channels=1)(x, t)
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
    assert torch.equal(guided(model, cond, 1.0, 1)(x, t), model(x, t, cond))
    assert len(model.calls) == 2
    assert model.calls[0].batch_size == 2


def test_control_guidance_formula_and_plain_cfg_at_control_scale_one():
    """A toy model whose output is 1 + 2*[semantic kept] + 5*[control kept]: the three-evaluation formula picks
    the right branches, and control scale 1 is plain CFG with the control kept in both branches."""
    from ldmkit.conditioning.cond import Cond
    from ldmkit.diffusion.guidance import guided

    def toy(x, t, cond):
        sem = (~cond.drop_semantic).float() if cond.drop_semantic is not None else torch.ones(len(x))
        ctrl = (~cond.drop_control).float() if cond.drop_control is not None else torch.ones(len(x))
        return (1 + 2 * sem + 5 * ctrl)[:, None, None, None] * torch.ones_like(x)

    x, t = torch.zeros(2, 1, 2, 2), torch.rand(2)
    cond = Cond(class_labels=torch.tensor([1, 2]), control={"flip": torch.zeros(2, 1)})
    u, c_sem, c_full = 1.0, 3.0, 8.0
    out = guided(toy, cond, scale=3.0, control_scale=2.0)(x, t)
    assert torch.allclose(out, torch.full_like(x, u + 3.0 * (c_sem - u) + 2.0 * (c_full - c_sem)))
    plain = guided(toy, cond, scale=3.0, control_scale=1.0)(x, t)
    assert torch.allclose(plain, torch.full_like(x, 6.0 + 3.0 * (8.0 - 6.0)))  # u' = control kept, no semantic: 6


def test_a_negative_condition_takes_the_place_of_the_null_one():
    from ldmkit.conditioning.cond import Cond
    from ldmkit.diffusion.guidance import guided

    def model(x, t, cond):  # the "prediction" is the class id, or -1 for the null class
        ids = (
            torch.where(cond.drop_semantic, -1, cond.class_labels)
            if cond.drop_semantic is not None
            else cond.class_labels
        )
        return ids.float().view(-1, 1, 1, 1).expand_as(x)

    x, t = torch.zeros(2, 1, 2, 2), torch.zeros(2)
    cond = Cond(class_labels=torch.tensor([3, 4]))
    plain = guided(model, cond, 2.0)(x, t)  # u + 2 (c - u) with u = -1
    assert plain[:, 0, 0, 0].tolist() == [7.0, 9.0]
    negative = guided(model, cond, 2.0, negative=Cond(class_labels=torch.tensor([1, 1])))(x, t)  # u = 1
    assert negative[:, 0, 0, 0].tolist() == [5.0, 7.0]
    with pytest.raises(ValueError, match="plain guidance"):
        guided(model, cond, 2.0, control_scale=2.0, negative=cond)
