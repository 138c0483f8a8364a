"""Classifier-free guidance and its variants, as one Guidance object that sample.* describes.

The model is evaluated on [conditional; unconditional] in one batch; with a separate control scale (PAPER.md
section 2), on [full; semantic only; neither]. On top of that: a scale that changes with the noise level (MDT-v2's
power-cosine, linear), an interval of noise levels outside which only the conditional prediction is used
(Kynkaenniemi et al. 2024), guidance on the first k channels only (DiT and MDT-v2 guide 3 of 4), skip-layer guidance
(SD3.5's reference sampler) and a negative condition in place of the null one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from ..conditioning.cond import Cond


@dataclass(frozen=True)
class Guidance:
    scale: float = 1.0  # w: u + w (c - u); 1 = the conditional prediction alone
    schedule: str = "constant"  # constant | power_cosine | linear
    exponent: float = 4.0  # power_cosine
    interval: tuple[float, float] | None = None  # guide where low < level <= high
    interval_space: str = "sigma"  # sigma (EDM's noise-to-signal ratio) | t (model time)
    channels: int | None = None  # guide the first k output channels; the rest come from the conditional half
    control_scale: float = 1.0  # != 1: separate guidance on the control values (three evaluations)
    skip_layers: tuple[int, ...] = ()
    skip_scale: float = 0.0
    skip_interval: tuple[float, float] = (0.01, 0.2)  # fractions of `steps` model evaluations
    steps: int = 0  # the sampler's steps (skip-layer guidance counts evaluations against them, as SD3.5 does)
    noise_to_signal: Callable[[float], float] | None = field(default=None, compare=False)  # t -> EDM sigma

    @classmethod
    def from_config(
        cls, sample_cfg, objective=None, scale: float | None = None, steps: int | None = None, channels=None
    ) -> "Guidance":
        s = sample_cfg
        return cls(
            scale=s.guidance_scale if scale is None else scale,
            schedule=s.guidance_schedule,
            exponent=s.guidance_exponent,
            interval=tuple(s.guidance_interval) if s.guidance_interval else None,
            interval_space=s.guidance_interval_space,
            channels=s.guided_channels or channels,
            control_scale=s.control_guidance_scale,
            skip_layers=tuple(s.skip_layers),
            skip_scale=s.skip_layer_scale,
            skip_interval=tuple(s.skip_layer_interval),
            steps=s.steps if steps is None else steps,
            noise_to_signal=None if objective is None else objective.noise_to_signal,
        )

    def scale_at(self, t: float) -> float:
        """The guidance scale at model time t in [0, 1] (1 = pure noise)."""
        if self.interval is not None:
            if self.interval_space == "sigma":
                if self.noise_to_signal is None:
                    raise ValueError("a guidance interval in sigma needs the objective's noise_to_signal")
                level = self.noise_to_signal(t)
            else:
                level = t
            low, high = self.interval
            if not low < level <= high:
                return 1.0
        if self.schedule == "power_cosine":  # MDT-v2: 0 at pure noise, 1 at the data
            weight = (1 - math.cos(math.pi * (1 - t) ** self.exponent)) / 2
        elif self.schedule == "linear":
            weight = 1 - t
        else:
            weight = 1.0
        return 1 + (self.scale - 1) * weight

    def skips_at(self, evaluation: int) -> bool:
        """Whether skip-layer guidance applies at this model evaluation (counted from 0), as SD3.5's reference
        SkipLayerCFGDenoiser decides: start * steps < evaluation < end * steps."""
        start, end = self.skip_interval
        return self.skip_scale > 0 and bool(self.skip_layers) and start * self.steps < evaluation < end * self.steps

    def describe(self) -> dict:
        """The settings that shape the result, for metrics files and reports (defaults left out)."""
        out = {"scale": self.scale}
        if self.schedule != "constant":
            out["schedule"] = self.schedule + (f"^{self.exponent:g}" if self.schedule == "power_cosine" else "")
        if self.interval is not None:
            out["interval"] = f"({self.interval[0]:g}, {self.interval[1]:g}] in {self.interval_space}"
        if self.channels is not None:
            out["channels"] = self.channels
        if self.control_scale != 1.0:
            out["control_scale"] = self.control_scale
        if self.skip_scale > 0 and self.skip_layers:
            out["skip_layers"] = list(self.skip_layers)
            out["skip_scale"] = self.skip_scale
            out["skip_interval"] = list(self.skip_interval)
        return out


class SkippedBlock(nn.Module):
    """Stands in for a block while skip-layer guidance runs without it: passes its inputs on unchanged."""

    def __init__(self, passthrough):
        super().__init__()
        self.passthrough = passthrough

    def forward(self, *args, **kwargs):
        return self.passthrough(*args, **kwargs)


class SkippingBlocks:
    """A context that runs `model` with its repeated blocks `indices` (the spec's block order, e.g. mmDiT's
    joint_blocks) swapped for SkippedBlock stand-ins. The blocks are found and checked once, when it is built
    (a one-line ValueError for a backbone without skippable blocks or a block that does not exist)."""

    def __init__(self, model: nn.Module, indices):
        from ..models.registry import spec_of

        model = getattr(model, "_orig_mod", model)  # under torch.compile: the model itself
        spec = spec_of(model)
        if spec.skip_block is None:
            raise ValueError(f"skip-layer guidance needs a transformer backbone; {spec.name} has no skippable blocks")
        blocks = spec.blocks(model)
        bad = [i for i in indices if not 0 <= i < len(blocks)]
        if bad:
            raise ValueError(
                f"sample.skip_layers: block {bad[0]} does not exist ({spec.name} has {len(blocks)} blocks)"
            )
        owners = {id(m): (parent, name) for parent in model.modules() for name, m in parent.named_children()}
        self.swaps = [(*owners[id(blocks[i])], blocks[i]) for i in indices]  # (parent, name, block)
        self.stand_in = SkippedBlock(spec.skip_block)

    def __enter__(self) -> None:
        for parent, name, _ in self.swaps:
            parent._modules[name] = self.stand_in

    def __exit__(self, *exc) -> None:
        for parent, name, block in self.swaps:
            parent._modules[name] = block


def guided(model, cond: Cond, guidance: Guidance, negative: Cond | None = None):
    """fn(x, t) -> the guided prediction `u + w(t) (c - u)` (+ control and skip-layer terms). u is the prediction
    with the null condition, or with `negative` when given (guidance then steers away from it). Where w(t) is 1 and
    there is no control guidance only the conditional half is evaluated. Guidance acts on the first
    guidance.channels channels; the rest (a learned variance, DiT's 4th channel) come from the conditional half.

    control_scale != 1 adds guidance on the control values (our reading of PAPER.md): with u the prediction with
    neither condition (or the negative one, without control), c_sem with the semantic one only and c_full with
    both, `u + w (c_sem - u) + control_scale (c_full - c_sem)`.
    """
    B = cond.batch_size
    device = next(
        getattr(cond, f) for f in ("class_labels", "pooled", "context") if getattr(cond, f) is not None
    ).device
    yes, no = torch.zeros(B, dtype=torch.bool, device=device), torch.ones(B, dtype=torch.bool, device=device)
    if negative is not None:
        uncond = negative.map(lambda v: v)
        uncond.drop_semantic = yes
    else:
        uncond = cond.map(lambda v: v)
        uncond.drop_semantic = no
    if guidance.control_scale != 1.0:
        full, semantic = cond.map(lambda v: v), cond.map(lambda v: v)
        full.drop_semantic, full.drop_control = yes, yes
        semantic.drop_semantic, semantic.drop_control = yes, no
        uncond.drop_control = no
        branches = [full, semantic, uncond]
    else:
        branches = [cond, uncond]
    batch = Cond.cat(branches)
    skipping = SkippingBlocks(model, guidance.skip_layers) if guidance.skip_scale > 0 and guidance.skip_layers else None
    evaluations = [0]

    varies = guidance.schedule != "constant" or guidance.interval is not None

    def fn(x, t):
        w = guidance.scale_at(float(t[0])) if varies else guidance.scale  # reading t back is a sync on a GPU
        if w == 1.0 and guidance.control_scale == 1.0:
            c = model(x, t, cond)
            out = c
        else:
            n = len(branches)
            parts = model(torch.cat([x] * n), torch.cat([t] * n), batch).chunk(n)
            c, u = parts[0], parts[-1]
            out = u + w * (c - u) if n == 2 else u + w * (parts[1] - u) + guidance.control_scale * (c - parts[1])
        if skipping is not None and guidance.skips_at(evaluations[0]):
            with skipping:
                out = out + guidance.skip_scale * (c - model(x, t, cond))
        evaluations[0] += 1
        k = guidance.channels or out.shape[1]
        return torch.cat([out[:, :k], c[:, k:]], dim=1)

    return fn
