"""Foundations of the paper's conditioning (issue 6): the control schedule w(t), the control embedder's
schedule gating, and the text padding strategies."""

import math

import pytest
import torch

from ldmkit.conditioning.padding import pad_text
from ldmkit.models.control import ControlEmbedder, ControlSchedule


def test_schedule_end_points_and_monotone():
    t = torch.linspace(0, 1, 101)
    for kind, kw in (
        ("cosine", dict(start=0.2, end=0.8, power=2.0)),
        ("linear", dict(start=0.1, end=0.9)),
        ("cosine", {}),
    ):
        w = ControlSchedule(kind, **kw)(t)
        start, end = kw.get("start", 0.0), kw.get("end", 1.0)
        assert torch.all(w[t <= start] == 1)
        assert torch.all(w[t >= end] == 0)
        assert torch.all(w[1:] <= w[:-1] + 1e-7)  # never increases with the noise level
    assert torch.allclose(
        ControlSchedule()(torch.tensor([0.5])), torch.tensor([math.cos(math.pi / 4)])
    )  # cos(pi t / 2)
    assert torch.all(ControlSchedule("constant")(t) == 1)
    with pytest.raises(ValueError, match="start < end"):
        ControlSchedule("cosine", start=0.6, end=0.4)


def test_low_level_controls_do_not_matter_where_their_weight_is_zero():
    torch.manual_seed(0)
    emb = ControlEmbedder(
        16,
        {"original_size": 2, "flip": 1},
        {"low_level": ["original_size"], "high_level": ["flip"]},
        {"low_level": ControlSchedule("cosine", 0.0, 0.5), "high_level": ControlSchedule("constant")},
        value_scale=1e-3,
    )
    flip = torch.tensor([[0.0], [1.0]])
    t_late, t_early = torch.tensor([0.7, 0.9]), torch.tensor([0.1, 0.2])  # late = noisy: t >= end, weight 0
    a = emb({"original_size": torch.tensor([[256.0, 256.0], [512.0, 384.0]]), "flip": flip}, t_late)
    b = emb({"original_size": torch.tensor([[1024.0, 64.0], [32.0, 32.0]]), "flip": flip}, t_late)
    assert torch.equal(a, b)
    c = emb({"original_size": torch.tensor([[256.0, 256.0], [512.0, 384.0]]), "flip": flip}, t_early)
    d = emb({"original_size": torch.tensor([[1024.0, 64.0], [32.0, 32.0]]), "flip": flip}, t_early)
    assert not torch.allclose(c, d)
    dropped = emb.group_vectors({"original_size": torch.ones(2, 2), "flip": flip}, torch.tensor([True, False]))
    assert torch.equal(dropped["high_level"][0], emb.null["high_level"].detach())
    assert torch.equal(dropped["low_level"][0], emb.null["low_level"].detach())
    with pytest.raises(ValueError, match="'flip' is missing"):
        emb({"original_size": torch.ones(2, 2)}, t_late)


def test_padding_strategies():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]).bool()
    zero, zmask = pad_text(tokens, mask, "zero")
    assert torch.equal(zmask, mask)
    assert torch.all(zero[0, 2:] == 0)
    assert torch.equal(zero[0, :2], tokens[0, :2])
    unmasked, umask = pad_text(tokens, mask, "zero_unmasked")
    assert torch.equal(unmasked, zero) and umask.all()  # the same zeros, now attended
    rep, rmask = pad_text(tokens, mask, "replicate")
    assert rmask.all()
    assert torch.equal(rep[0, 2], tokens[0, 0])
    assert torch.equal(rep[0, 3], tokens[0, 1])
    assert torch.equal(rep[1, 4], tokens[1, 0])
    torch.manual_seed(0)
    big = torch.randn(1, 400, 64) * 3 + 1
    m = torch.zeros(1, 400, dtype=torch.bool)
    m[0, :100] = True
    noisy, _ = pad_text(big, m, "noisy_replicate", sigma=0.5, generator=torch.Generator().manual_seed(1))
    assert torch.equal(noisy[0, :100], big[0, :100])
    residual = noisy[0, 100:] - big[0, torch.arange(100, 400) % 100]
    assert residual.std().item() == pytest.approx(0.5 * big[0, :100].std().item(), rel=0.05)
    assert abs(residual.mean().item()) < 0.05
    empty, emask = pad_text(tokens, torch.zeros(2, 5, dtype=torch.bool), "noisy_replicate")
    assert not emask.any()
