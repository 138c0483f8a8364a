"""Optimizers the published recipes use beyond torch's: Adan (Xie et al., 2022), MDT-v2's optimizer.

Adan keeps three moving averages per parameter: of the gradient (m), of the gradient's change since the
previous step (v), and of the squared Nesterov-corrected gradient g + beta2 * (g - g_prev) (n), all bias
corrected; the update is lr * (m / bc1 + beta2 * v / bc2) / (sqrt(n / bc3) + eps), and weight decay is applied
proximally (divide by 1 + lr * weight_decay), as sail-sg/Adan's default. Betas follow that code's convention
(0.98, 0.92, 0.99): the weight of the old average. Gradient clipping is the training loop's.
"""

from __future__ import annotations

import math

import torch


class Adan(torch.optim.Optimizer):
    def __init__(
        self, params, lr: float = 1e-3, betas=(0.98, 0.92, 0.99), eps: float = 1e-8, weight_decay: float = 0.0
    ):
        if len(betas) != 3 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Adan takes three betas in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2, beta3 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)  # m
                    state["exp_avg_diff"] = torch.zeros_like(p)  # v
                    state["exp_avg_sq"] = torch.zeros_like(p)  # n
                    state["prev_grad"] = g.clone()  # the first step has no change: diff = 0
                state["step"] += 1
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
        return loss


def build_optimizer(params, train_cfg) -> torch.optim.Optimizer:
    if train_cfg.optimizer == "adan":
        return Adan(
            params,
            lr=train_cfg.lr,
            betas=tuple(train_cfg.betas),
            eps=train_cfg.eps,
            weight_decay=train_cfg.weight_decay,
        )
    return torch.optim.AdamW(
        params, lr=train_cfg.lr, betas=tuple(train_cfg.betas), weight_decay=train_cfg.weight_decay, eps=train_cfg.eps
    )
