"""Adan against its update rule written out step by step, state round trip, and the config switch."""

import pytest
import torch
from conftest import TINY, state_of

from ldmkit.config import ConfigError, load_config
from ldmkit.training.loop import training_loop
from ldmkit.training.optim import Adan


def test_adan_follows_its_update_rule():
    b1, b2, b3, lr, eps, wd = 0.98, 0.92, 0.99, 0.1, 1e-8, 0.05
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = Adan([p], lr=lr, betas=(b1, b2, b3), eps=eps, weight_decay=wd)
    theta, m, v, n, prev = p.detach().clone(), torch.zeros(2), torch.zeros(2), torch.zeros(2), None
    for k, g in enumerate([torch.tensor([0.5, 1.0]), torch.tensor([-0.2, 0.4]), torch.tensor([0.3, 0.3])], start=1):
        p.grad = g.clone()
        opt.step()
        diff = torch.zeros(2) if prev is None else g - prev
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * diff
        n = b3 * n + (1 - b3) * (g + b2 * diff) ** 2
        denom = (n / (1 - b3**k)).sqrt() + eps
        theta = (theta - lr * (m / (1 - b1**k)) / denom - lr * b2 * (v / (1 - b2**k)) / denom) / (1 + lr * wd)
        prev = g
        assert torch.allclose(p.detach(), theta, atol=1e-6), k


@pytest.mark.slow
def test_adan_trains_and_resumes_exactly(tmp_path):
    overrides = TINY + ["train.optimizer=adan", "train.betas=[0.98, 0.92, 0.99]", "train.lr=0.002"]
    straight = training_loop(load_config(overrides=overrides), tmp_path / "a", quiet=True)
    training_loop(load_config(overrides=overrides), tmp_path / "b", quiet=True, stop_after_images=64)
    training_loop(load_config(overrides=overrides), tmp_path / "b", quiet=True)
    a, b = state_of(straight)["model"], state_of(tmp_path / "b")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="adan takes 3 values"):
        load_config(overrides=["train.optimizer=adan"])
