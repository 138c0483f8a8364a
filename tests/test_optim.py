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
@pytest.mark.parametrize("impl", ["for_loop", "foreach"])
def test_adan_trains_and_resumes_exactly(tmp_path, impl):
    overrides = TINY + ["train.optimizer=adan", "train.betas=[0.98, 0.92, 0.99]", "train.lr=0.002"]
    overrides += [f"train.optimizer_impl={impl}"]
    straight = training_loop(load_config(overrides=overrides), tmp_path / "a", quiet=True)
    training_loop(load_config(overrides=overrides), tmp_path / "b", quiet=True, stop_after_images=64)
    training_loop(load_config(overrides=overrides), tmp_path / "b", quiet=True)
    a, b = state_of(straight)["model"], state_of(tmp_path / "b")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="adan takes 3 values"):
        load_config(overrides=["train.optimizer=adan"])


def random_grads(shapes, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in shapes] for _ in range(steps)]


def test_foreach_adan_equals_its_loop_and_skips_a_non_finite_step_on_the_device():
    shapes = [(3, 4), (4,), (2, 2, 2)]
    start = [torch.randn(s, generator=torch.Generator().manual_seed(9)) for s in shapes]
    loop = [torch.nn.Parameter(t.clone()) for t in start]
    fast = [torch.nn.Parameter(t.clone()) for t in start]
    args = dict(lr=0.05, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.02)
    opt_loop, opt_fast = Adan(loop, **args), Adan(fast, foreach=True, **args)
    for k, grads in enumerate(random_grads(shapes, 6)):
        if k == 3:  # a non-finite step: skipped by the foreach step on the device, simply not taken by the loop
            for p, g in zip(fast, grads):
                p.grad = torch.full_like(g, float("nan"))
            before = [p.detach().clone() for p in fast], [s["exp_avg"].clone() for s in opt_fast.state.values()]
            opt_fast.found_inf = torch.ones(())
            opt_fast.step()
            assert all(torch.equal(a, p) for a, p in zip(before[0], fast))
            assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(before[1], opt_fast.state.values()))
            continue
        for p, q, g in zip(loop, fast, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_fast.found_inf = torch.zeros(())
        opt_loop.step()
        opt_fast.step()
        for p, q in zip(loop, fast):
            assert torch.allclose(p, q, rtol=1e-6, atol=1e-7), k
    assert int(opt_fast.state[fast[0]]["step"]) == 5 == opt_loop.state[loop[0]]["step"]
    with pytest.raises(ValueError, match="only with foreach"):
        opt_loop.found_inf = torch.zeros(())
        opt_loop.step()


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_adamw_implementations_agree(impl):
    from ldmkit.config import TrainConfig
    from ldmkit.training.optim import build_optimizer, device_skip

    shapes = [(5, 3), (7,)]
    start = [torch.randn(s, generator=torch.Generator().manual_seed(1)) for s in shapes]
    ref, other = ([torch.nn.Parameter(t.clone()) for t in start] for _ in range(2))
    base = dict(lr=0.01, betas=[0.9, 0.95], weight_decay=0.1)
    opt_ref = build_optimizer(ref, TrainConfig(optimizer_impl="for_loop", **base))
    opt = build_optimizer(other, TrainConfig(optimizer_impl=impl, **base))
    assert device_skip(opt) == (impl == "fused")
    for grads in random_grads(shapes, 5):
        for p, q, g in zip(ref, other, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt_ref.step()
        opt.step()
    assert all(torch.allclose(p, q, rtol=1e-6, atol=1e-7) for p, q in zip(ref, other))
    with pytest.raises(ValueError, match="Adan has no fused kernel"):
        build_optimizer(ref, TrainConfig(optimizer="adan", betas=[0.98, 0.92, 0.99], optimizer_impl="fused"))


class HostReads:
    """Counts reads of tensor values back to the host (item, tolist, cpu, bool). Not counted: the class-id range
    check of LabelEmbedder.forward, which runs on CPU tensors only (never on a GPU, where it would stall)."""

    names = ("item", "tolist", "cpu", "__bool__")

    def __init__(self, monkeypatch):
        import sys

        self.count = 0
        for name in self.names:
            original = getattr(torch.Tensor, name)

            def counted(t, *a, _original=original, **k):
                caller = sys._getframe(1)
                in_label_check = caller.f_code.co_name == "forward" and (
                    type(caller.f_locals.get("self")).__name__ == "LabelEmbedder"
                )
                self.count += not in_label_check
                return _original(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("impl", ["fused", "foreach", "for_loop"])
def test_the_steady_state_step_reads_nothing_back_to_the_host(tmp_path, monkeypatch, impl):
    """With the device-skipping optimizers (fused AdamW, foreach Adan) a training step makes no host read: two runs
    that differ only in their number of steps (same status lines and checkpoints) make the same number of reads.
    The host-side NaN guard (for_loop AdamW) reads every step, which this counts."""
    sets = TINY + ["train.log_every_images=100000", "train.checkpoint_every_images=100000"]
    sets += [f"train.optimizer_impl={impl}"]
    if impl == "foreach":
        sets += ["train.optimizer=adan", "train.betas=[0.98, 0.92, 0.99]"]
    reads = HostReads(monkeypatch)
    counts = []
    for images in (32, 80):  # 2 and 5 steps of 16
        reads.count = 0
        training_loop(
            load_config(overrides=sets + [f"train.total_images={images}"]), tmp_path / str(images), quiet=True
        )
        counts.append(reads.count)
    if impl == "for_loop":  # the NaN guard's read, and torch's tensor-by-tensor AdamW reads each step count
        assert counts[1] - counts[0] >= 3
    else:
        assert counts[0] == counts[1], counts
