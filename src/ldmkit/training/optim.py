"""Optimizers: torch's AdamW (fused, foreach or tensor by tensor) and Adan (Xie et al., 2022), MDT-v2's optimizer.

Adan keeps three moving averages per parameter: of the gradient (m), of the gradient's change since the
previous step (v), and of the squared Nesterov-corrected gradient g + beta2 * (g - g_prev) (n), all bias
corrected; the update is lr * (m / bc1 + beta2 * v / bc2) / (sqrt(n / bc3) + eps), and weight decay is applied
proximally (divide by 1 + lr * weight_decay), as sail-sg/Adan's default. Betas follow that code's convention
(0.98, 0.92, 0.99): the weight of the old average. Gradient clipping is the training loop's.

A step whose gradients are not finite is skipped without reading anything back to the host when the optimizer
can do it on the device (`device_skip`): the loop sets `optimizer.found_inf` (a 0/1 tensor), as torch's
GradScaler does for fused AdamW; Adan's foreach step reads it too.
"""

from __future__ import annotations

import math

import torch


class Adan(torch.optim.Optimizer):
    """Adan. foreach=True runs each operation once over all tensors, keeps the step count on the device and skips
    the step on the device when `self.found_inf` (a 0/1 tensor) is 1; foreach=False goes tensor by tensor."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.98, 0.92, 0.99),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        foreach: bool = False,
    ):
        if len(betas) != 3 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Adan takes three betas in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.foreach = foreach
        self.found_inf: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if self.foreach:
                self._foreach_step(group)
            else:
                if self.found_inf is not None:
                    raise ValueError("Adan skips steps on the device only with foreach=True")
                self._loop_step(group)
        return loss

    def _init_state(self, p, g, step) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = step
            state["exp_avg"] = torch.zeros_like(p)  # m
            state["exp_avg_diff"] = torch.zeros_like(p)  # v
            state["exp_avg_sq"] = torch.zeros_like(p)  # n
            state["prev_grad"] = g.clone()  # the first step has no change: diff = 0
        return state

    def _loop_step(self, group) -> None:
        beta1, beta2, beta3 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self._init_state(p, g, 0)
            state["step"] = int(state["step"]) + 1
            k = state["step"]
            diff = g - state["prev_grad"]
            state["exp_avg"].mul_(beta1).add_(g, alpha=1 - beta1)
            state["exp_avg_diff"].mul_(beta2).add_(diff, alpha=1 - beta2)
            nesterov = g + beta2 * diff
            state["exp_avg_sq"].mul_(beta3).addcmul_(nesterov, nesterov, value=1 - beta3)
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta3**k)).add_(eps)
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**k))
            p.addcdiv_(state["exp_avg_diff"], denom, value=-lr * beta2 / (1 - beta2**k))
            if wd:
                p.div_(1 + lr * wd)
            state["prev_grad"].copy_(g)

    def _foreach_step(self, group) -> None:
        beta1, beta2, beta3 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        device = params[0].device
        states = [self._init_state(p, p.grad, torch.zeros((), device=device)) for p in params]
        grads = [p.grad for p in params]
        # keep: 1 for a step, 0 for a skipped one; a skipped step's gradients are zeroed first, so that nothing
        # non-finite reaches the averages (each update below is then scaled by keep)
        keep = torch.ones((), device=device) if self.found_inf is None else 1 - self.found_inf.to(device)
        if self.found_inf is not None:
            for g in grads:
                torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
        step = states[0]["step"] + keep  # one count for the group, on the device
        for state in states:
            state["step"] = step
        m, v, n, prev = ([s[key] for s in states] for key in ("exp_avg", "exp_avg_diff", "exp_avg_sq", "prev_grad"))
        diff = torch._foreach_sub(grads, prev)
        torch._foreach_lerp_(m, grads, [(1 - beta1) * keep] * len(m))
        torch._foreach_lerp_(v, diff, [(1 - beta2) * keep] * len(v))
        nesterov = torch._foreach_add(grads, diff, alpha=beta2)
        torch._foreach_lerp_(n, torch._foreach_mul(nesterov, nesterov), [(1 - beta3) * keep] * len(n))
        safe = torch.clamp(step, min=1)  # a skipped first step: the bias corrections stay finite (keep is 0)
        bc1, bc2, bc3 = (1 - beta**safe for beta in (beta1, beta2, beta3))
        denom = torch._foreach_sqrt(n)
        torch._foreach_div_(denom, [torch.sqrt(bc3)] * len(n))
        torch._foreach_add_(denom, eps)
        update = torch._foreach_div(m, denom)
        torch._foreach_mul_(update, [-lr * keep / bc1] * len(m))
        update_diff = torch._foreach_div(v, denom)
        torch._foreach_mul_(update_diff, [-lr * beta2 * keep / bc2] * len(v))
        torch._foreach_add_(params, update)
        torch._foreach_add_(params, update_diff)
        if wd:
            torch._foreach_div_(params, [1 + lr * wd * keep] * len(params))
        torch._foreach_lerp_(prev, grads, [keep] * len(prev))


def optimizer_impl(train_cfg, device_type: str) -> str:
    """The step implementation train.optimizer_impl resolves to on this device (see the config's comment)."""
    impl = train_cfg.optimizer_impl
    if impl == "auto":
        impl = ("fused" if train_cfg.optimizer == "adamw" else "foreach") if device_type == "cuda" else "for_loop"
    if impl == "fused" and train_cfg.optimizer == "adan":
        raise ValueError("config key 'train.optimizer_impl': Adan has no fused kernel; use foreach")
    return impl


def build_optimizer(params, train_cfg, device_type: str = "cpu") -> torch.optim.Optimizer:
    impl = optimizer_impl(train_cfg, device_type)
    common = dict(lr=train_cfg.lr, betas=tuple(train_cfg.betas), eps=train_cfg.eps, weight_decay=train_cfg.weight_decay)
    if train_cfg.optimizer == "adan":
        return Adan(params, foreach=impl == "foreach", **common)
    return torch.optim.AdamW(params, fused=impl == "fused", foreach=impl == "foreach", **common)


def device_skip(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer skips a non-finite step on the device (optimizer.found_inf)."""
    if isinstance(optimizer, Adan):
        return optimizer.foreach
    return bool(optimizer.defaults.get("fused"))
