"""Positional embeddings for another token grid (PAPER.md section 3; our reading of its "rectified grid sampling").

A table trained on a G0 x G0 grid is used on a G1 x G1 grid. Each mode says at which (fractional) positions of the
old grid the new cells sit:
- `extrapolate`: i (the new grid continues the old one: positions G0..G1-1 were never seen);
- `interpolate`: i * G0 / G1 (the same extent as the old grid, but starting at the first cell's centre: shifted by
  half a new cell towards the far side);
- `rectified`:   (i + 0.5) * G0 / G1 - 0.5 (cell centres: the new grid covers exactly the old grid's extent, so
  its corners and centre fall where the old ones were; bilinear resampling with align_corners=False).
Fixed sin-cos tables are recomputed at those positions; learned tables are sampled there bilinearly (positions
outside the old grid take the border values); relative-position bias tables (MDT) are resampled the same way
over the offsets -(G-1)..(G-1).
"""

from __future__ import annotations

import numpy as np
import torch

from ..models.layers import RESAMPLE_MODES, grid_positions, sincos_table

__all__ = ["RESAMPLE_MODES", "grid_positions", "sincos_table", "resample_learned", "resample_relative_bias"]


def _sample_bilinear(grid: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
    """grid [C, H, W] sampled at fractional (row, col) positions -> [C, len(rows), len(cols)], border-clamped."""
    C, H, W = grid.shape

    def axis(pos: np.ndarray, size: int):
        pos = np.clip(pos, 0.0, size - 1.0)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, size - 1)
        return torch.from_numpy(lo), torch.from_numpy(hi), torch.from_numpy(pos - lo).to(grid.dtype)

    r0, r1, fr = axis(rows, H)
    c0, c1, fc = axis(cols, W)
    top = grid[:, r0][:, :, c0] * (1 - fc) + grid[:, r0][:, :, c1] * fc
    bottom = grid[:, r1][:, :, c0] * (1 - fc) + grid[:, r1][:, :, c1] * fc
    return top * (1 - fr)[:, None] + bottom * fr[:, None]


def resample_learned(table: torch.Tensor, old: tuple[int, int], new: tuple[int, int], mode: str) -> torch.Tensor:
    """A learned table [1, old_h * old_w, D] -> [1, new_h * new_w, D] by bilinear sampling at the mode's positions."""
    D = table.shape[-1]
    if table.shape[-2] != old[0] * old[1]:
        raise ValueError(
            f"positional table has {table.shape[-2]} rows, not the {old[0]}x{old[1]} grid's {old[0] * old[1]}"
        )
    grid = table.reshape(old[0], old[1], D).permute(2, 0, 1).float()  # [D, H, W]
    out = _sample_bilinear(grid, grid_positions(new[0], old[0], mode), grid_positions(new[1], old[1], mode))
    return out.permute(1, 2, 0).reshape(1, new[0] * new[1], D).to(table.dtype)


def resample_relative_bias(table: torch.Tensor, old: int, new: int, mode: str, extra_rows: int = 0) -> torch.Tensor:
    """A relative-position bias table [(2*old-1)^2 + extra_rows, heads] (offsets -(old-1)..old-1 per axis, then rows
    kept as they are, e.g. BEiT's 3 class-token entries) -> [(2*new-1)^2 + extra_rows, heads]. An offset d of the
    new grid is d * old / new cells of the old one (interpolate and rectified: the constant half-cell offset of
    rectified cancels in a difference of positions); extrapolate keeps d, border-clamped."""
    if mode not in RESAMPLE_MODES:
        raise ValueError(f"unknown positional-embedding resampling {mode!r} (one of {', '.join(RESAMPLE_MODES)})")
    if extra_rows:
        return torch.cat([resample_relative_bias(table[:-extra_rows], old, new, mode), table[-extra_rows:]])
    heads = table.shape[-1]
    span_old, span_new = 2 * old - 1, 2 * new - 1
    if table.shape[0] != span_old**2:
        raise ValueError(f"relative-position table has {table.shape[0]} rows, not the {old}x{old} grid's {span_old**2}")
    offsets = np.arange(-(new - 1), new, dtype=np.float64)
    scaled = offsets if mode == "extrapolate" else offsets * old / new
    index = scaled + (old - 1)  # offset -> row of the old table
    grid = table.reshape(span_old, span_old, heads).permute(2, 0, 1).float()
    out = _sample_bilinear(grid, index, index)
    return out.permute(1, 2, 0).reshape(span_new**2, heads).to(table.dtype)
