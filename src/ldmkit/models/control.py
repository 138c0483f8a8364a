"""Control conditioning (the paper's section 2): crop metadata embedded per key, grouped, and phased in over the
noise levels by a schedule w(t), so that low-level controls act only late in denoising.

Our reading, every part configurable: each control value goes through sinusoidal (Fourier) features and a
per-key MLP; a group's vector is the sum of its keys' vectors; dropped samples (guidance) use the group's
learned null vector; the group vector is multiplied by w_group(t) before it joins the timestep embedding.
t is the noise level in [0, 1] (1 = pure noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .layers import timestep_embedding

SCHEDULES = ("cosine", "constant", "linear")


@dataclass
class ControlSchedule:
    """w(t): 1 for t <= start, 0 for t >= end, and in between cos(pi/2 * s) ** power (cosine) or 1 - s
    (linear), with s = (t - start) / (end - start); constant is 1 everywhere."""

    kind: str = "cosine"
    start: float = 0.0
    end: float = 1.0
    power: float = 1.0

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"unknown control schedule {self.kind!r} (one of {', '.join(SCHEDULES)})")
        if self.kind != "constant" and not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"control schedule needs 0 <= start < end <= 1, got start {self.start}, end {self.end}")

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "constant":
            return torch.ones_like(t, dtype=torch.float32)
        t = t.float()
        s = ((t - self.start) / (self.end - self.start)).clamp(0.0, 1.0)
        w = 1.0 - s if self.kind == "linear" else torch.cos(0.5 * math.pi * s).clamp(min=0.0) ** self.power
        # exactly 1 up to start and 0 from end on (float rounding of s must not leak a small weight)
        return torch.where(t <= self.start, torch.ones_like(w), torch.where(t >= self.end, torch.zeros_like(w), w))


class ControlEmbedder(nn.Module):
    """Named control values -> one vector [B, D] per group, weighted by the group's schedule.

    keys: {name: number of values}, e.g. {"original_size": 2, "crop_top_left": 2, "flip": 1}; groups:
    {group: [names]}; schedules: {group: ControlSchedule}. Each value is scaled by `value_scale` (pixel
    sizes and offsets ~ 1000 become ~ 1) and embedded with `frequency_dim` sinusoidal features."""

    def __init__(
        self,
        dim: int,
        keys: dict[str, int],
        groups: dict[str, list[str]],
        schedules: dict[str, ControlSchedule],
        frequency_dim: int = 256,
        value_scale: float = 1.0,
    ):
        super().__init__()
        unknown = [k for names in groups.values() for k in names if k not in keys]
        if unknown:
            raise ValueError(f"control groups name unknown keys: {', '.join(unknown)}")
        self.keys, self.groups, self.schedules = dict(keys), {g: list(n) for g, n in groups.items()}, schedules
        self.frequency_dim, self.value_scale = frequency_dim, value_scale
        self.embedders = nn.ModuleDict(
            {
                name: nn.Sequential(nn.Linear(count * frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
                for name, count in keys.items()
            }
        )
        self.null = nn.ParameterDict({group: nn.Parameter(torch.zeros(dim)) for group in groups})

    def group_vectors(
        self, control: dict[str, torch.Tensor], drop: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Unweighted group vectors {group: [B, D]}; dropped rows take the group's null vector."""
        out = {}
        for group, names in self.groups.items():
            vec = None
            for name in names:
                if name not in control:
                    raise ValueError(
                        f"control value {name!r} is missing "
                        f"(cond.control has {', '.join(sorted(control)) or 'nothing'})"
                    )
                values = control[name].reshape(control[name].shape[0], -1).float() * self.value_scale  # [B, k]
                if values.shape[1] != self.keys[name]:
                    raise ValueError(
                        f"control {name!r} has {values.shape[1]} values per sample, expected {self.keys[name]}"
                    )
                features = timestep_embedding(values.flatten(), self.frequency_dim).reshape(values.shape[0], -1)
                emb = self.embedders[name](features.to(self.embedders[name][0].weight.dtype))
                vec = emb if vec is None else vec + emb
            if drop is not None:
                vec = torch.where(drop[:, None], self.null[group].to(vec.dtype).expand_as(vec), vec)
            out[group] = vec
        return out

    def forward(
        self, control: dict[str, torch.Tensor], t: torch.Tensor, drop: torch.Tensor | None = None
    ) -> torch.Tensor:
        """sum over groups of w_group(t) * group vector: [B, D], added to the timestep embedding."""
        vectors = self.group_vectors(control, drop)
        return sum(self.schedules[g](t)[:, None].to(v.dtype) * v for g, v in vectors.items())


def zero_init_control(embedder: ControlEmbedder | None) -> None:
    """Zero the output layer of every key's MLP, so a model with new control embeddings starts as one without."""
    if embedder is not None:
        for mlp in embedder.embedders.values():
            nn.init.zeros_(mlp[-1].weight)
            nn.init.zeros_(mlp[-1].bias)
