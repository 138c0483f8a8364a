"""Caption padding strategies (the paper's noisy replicate padding; our reading, docs/conditioning.md)."""

from __future__ import annotations

import torch

PADDINGS = ("zero", "zero_unmasked", "replicate", "noisy_replicate")


def pad_text(
    tokens: torch.Tensor,
    mask: torch.Tensor,
    strategy: str = "zero",
    sigma: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill the padding positions of caption tokens [B, N, D] (mask [B, N], True = real token, real tokens
    first). zero: zeros, mask kept. zero_unmasked: zeros, every position attended. replicate: position i > L takes
    real token ((i - 1) mod L) + 1 (1-based), all positions attended. noisy_replicate: the same plus
    sigma * std(real tokens) * eps, eps ~ N(0, I) from the generator. A caption with no real token is left as it
    is."""
    if strategy not in PADDINGS:
        raise ValueError(f"unknown text padding {strategy!r} (one of {', '.join(PADDINGS)})")
    if strategy == "zero":
        return tokens * mask[..., None].to(tokens.dtype), mask
    B, N, D = tokens.shape
    lengths = mask.sum(dim=1)  # [B]
    full = torch.where(lengths[:, None] > 0, torch.ones_like(mask), mask)
    if strategy == "zero_unmasked":  # the zeros are attended like real tokens
        return tokens * mask[..., None].to(tokens.dtype), full
    positions = torch.arange(N, device=tokens.device)[None].expand(B, N)
    source = torch.where(lengths[:, None] > 0, positions % lengths.clamp(min=1)[:, None], positions)  # 0-based copies
    out = torch.gather(tokens, 1, source[..., None].expand(B, N, D))
    if strategy == "noisy_replicate":
        real = mask[..., None].to(tokens.dtype)
        count = (real.sum(dim=(1, 2)) * D).clamp(min=1)
        mean = (tokens * real).sum(dim=(1, 2)) / count
        std = (((tokens - mean[:, None, None]) ** 2 * real).sum(dim=(1, 2)) / count).sqrt()  # per caption
        noise = torch.randn(out.shape, generator=generator, device=tokens.device, dtype=tokens.dtype)
        out = torch.where(mask[..., None], out, out + sigma * std[:, None, None] * noise)
    return out, full
