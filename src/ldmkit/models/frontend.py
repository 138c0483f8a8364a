"""The conditioning front end every backbone shares: a `Cond` -> (semantic vector for adaLN, attended tokens,
token mask), for the model's `conditioning` (class | pooled_text | text) and `semantic_path` (adaln | attention).

The backbones keep their own embedders (their names follow the official checkpoints); the front end only
decides which one runs, how dropped samples (`cond.drop_semantic`) reach it, and where its output goes.
Embedders with a null condition of their own (a null class row, a null pooled vector, PixArt's null caption)
set `takes_drop = True` and get the drop mask; any other embedder sees zeros for dropped samples, as
diffusers' pipelines feed an encoded empty prompt's zeroed tokens.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..conditioning.cond import Cond


def zero_dropped(x: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
    """x [B, ...] with the rows of dropped samples (drop [B] bool) set to zero."""
    if drop is None:
        return x
    return x * (~drop).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def embed(embedder: nn.Module | None, x: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
    """The embedder applied with the drop mask: passed on when it has its own null condition, else the dropped
    rows zeroed first; no embedder: the zeroed input itself (tokens attended as they come)."""
    if embedder is not None and getattr(embedder, "takes_drop", False):
        return embedder(x, drop)
    x = zero_dropped(x, drop)
    return x if embedder is None else embedder(x)


def semantic_inputs(
    cond: Cond,
    conditioning: str,
    semantic_path: str,
    embedder: nn.Module | None,
    pooled_embedder: nn.Module | None = None,
    class_token: bool = False,
    name: str = "model",
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(vector to add to the adaLN / time embedding [B, D] or None, attended tokens [B, L, D] or None, their
    mask [B, L] or None). `embedder` embeds the configured condition (class ids, the pooled caption, or caption
    tokens: None attends to them raw). With text and the adaln path, `pooled_embedder` also sums the pooled
    caption into adaLN (SD3). `class_token`: a class is attended as a token whatever its path (mmDiT's context
    stream)."""
    drop = cond.drop_semantic
    if conditioning == "class":
        if cond.class_labels is None:
            raise ValueError(f"this {name} is class-conditional: cond.class_labels is required")
        y = embed(embedder, cond.class_labels, drop)  # [B, D]
        tokens = y[:, None] if semantic_path == "attention" or class_token else None  # [B, 1, D]
        return (y if semantic_path == "adaln" else None), tokens, None
    if conditioning == "pooled_text":
        if cond.pooled is None:
            raise ValueError(f"this {name} is text-conditional: cond.pooled (the pooled caption vector) is required")
        return embed(embedder, cond.pooled, drop), None, None  # [B, D]
    with_pooled = semantic_path == "adaln"
    if cond.context is None or (with_pooled and cond.pooled is None):
        needs = (
            "cond.context (caption tokens) and cond.pooled are" if with_pooled else "cond.context (caption tokens) is"
        )
        raise ValueError(f"this {name} is text-conditional: {needs} required")
    tokens = embed(embedder, cond.context, drop)  # [B, L, D]
    pooled = embed(pooled_embedder, cond.pooled, drop) if with_pooled else None  # [B, D]
    return pooled, tokens, cond.context_mask


def plus(c: torch.Tensor, vector: torch.Tensor | None) -> torch.Tensor:
    """c + vector, or c when there is no vector."""
    return c if vector is None else c + vector


def plus_control(c: torch.Tensor, control_embedder: nn.Module | None, cond: Cond, t: torch.Tensor) -> torch.Tensor:
    """c plus the embedded control values, weighted by their w(t) (the additive and disentangled mechanisms)."""
    if control_embedder is None:
        return c
    return c + control_embedder(cond.control, t, cond.drop_control)
