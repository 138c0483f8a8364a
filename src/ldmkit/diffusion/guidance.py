"""Classifier-free guidance: the model evaluated on [conditional; unconditional] in one batch."""
from __future__ import annotations

import torch

from ..conditioning.cond import Cond


def guided(model, cond: Cond, scale: float, guided_channels: int | None = None):
    """Return fn(x, t) -> prediction with guidance `u + scale * (c - u)`.

    scale == 1 evaluates the conditional model only. guided_channels limits guidance to the first
    channels (the noise prediction of a learned-sigma output); the learned variance is taken from the
    conditional half, as DiT does. (DiT's own sample.py guides only 3 of 4 latent channels "for exact
    reproducibility"; ldmkit guides all of them, the standard form.)
    """
    if scale == 1.0:
        return lambda x, t: model(x, t, cond)
    uncond = cond.map(lambda v: v)
    B = cond.batch_size
    device = next(getattr(cond, f) for f in ("class_labels", "pooled", "context") if getattr(cond, f) is not None).device
    uncond.drop_semantic = torch.ones(B, dtype=torch.bool, device=device)
    both = Cond.cat([cond, uncond])

    def fn(x, t):
        out = model(torch.cat([x, x]), torch.cat([t, t]), both)
        c, u = out.chunk(2)
        k = guided_channels or out.shape[1]
        return torch.cat([u[:, :k] + scale * (c[:, :k] - u[:, :k]), c[:, k:]], dim=1)

    return fn
