"""The one conditioning object every backbone takes: `model(x_t, t, cond)`.

Backbones read only the fields they use and never raw batches. Guidance dropout is decided outside the
model (by the conditioner, from a seeded generator) and passed as masks, so runs are reproducible and
classifier-free guidance at sampling time is just `drop_semantic=True` for the unconditional half.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


@dataclass
class Cond:
    class_labels: torch.Tensor | None = None  # [B] int64 class ids
    context: torch.Tensor | None = None  # [B, L, Dc] text (or class) tokens
    context_mask: torch.Tensor | None = None  # [B, L] bool, True = real token
    pooled: torch.Tensor | None = None  # [B, Dp] pooled text vector
    control: dict[str, torch.Tensor] = field(default_factory=dict)  # named metadata, each [B] or [B, k]
    drop_semantic: torch.Tensor | None = None  # [B] bool, True = use the null semantic condition
    drop_control: torch.Tensor | None = None  # [B] bool, True = use the null control condition

    @property
    def batch_size(self) -> int | None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                return v.shape[0]
        return None

    def map(self, fn) -> "Cond":
        """Apply fn to every tensor (e.g. slicing, .to(device), repeat for guidance)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                out[f.name] = fn(v)
            elif isinstance(v, dict):
                out[f.name] = {k: fn(x) for k, x in v.items()}
        return replace(self, **out)

    def to(self, device) -> "Cond":
        return self.map(lambda v: v.to(device))

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        """Concatenate along the batch; a mask missing in one part is taken as all False."""
        first = conds[0]
        out = {}
        for f in fields(first):
            values = [getattr(c, f.name) for c in conds]
            if f.name in ("drop_semantic", "drop_control") and any(v is not None for v in values):
                values = [
                    v if v is not None else torch.zeros(c.batch_size, dtype=torch.bool) for v, c in zip(values, conds)
                ]
                out[f.name] = torch.cat([v.to(values[0].device) for v in values])
            elif isinstance(values[0], torch.Tensor):
                out[f.name] = torch.cat(values)
            elif isinstance(values[0], dict):
                out[f.name] = {k: torch.cat([v[k] for v in values]) for k in values[0]}
        return replace(first, **out)
