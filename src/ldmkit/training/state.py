"""The training state as small objects (after NVlabs/edm2): the EMA, the lr schedule, and the state that saves
and loads itself. The loop in loop.py only calls them."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..checkpoint import atomic_save, checkpoint_path, load_weights, prune_checkpoints
from ..config import to_dict


def ema_beta(cfg, images_seen: int) -> float:
    """The EMA's decay for one step: train.ema_decay per step, or a half-life in images (train.ema_halflife_images,
    optionally ramped up as images_seen * train.ema_rampup, as EDM2 does)."""
    t = cfg.train
    if t.ema_halflife_images is None:
        return t.ema_decay
    halflife = t.ema_halflife_images
    if t.ema_rampup is not None:
        halflife = min(halflife, images_seen * t.ema_rampup)
    return 0.5 ** (t.global_batch / max(halflife, 1e-8))


def learning_rate(train_cfg, images_seen: int) -> float:
    """The lr of the step that starts at images_seen: a linear warm-up over train.warmup_images, then constant."""
    tc = train_cfg
    if not tc.warmup_images:
        return tc.lr
    return tc.lr * min(1.0, (images_seen + tc.global_batch) / tc.warmup_images)


class EMA:
    """An exponential moving average of a model's parameters, kept as a frozen copy of the model."""

    def __init__(self, model: nn.Module, cfg):
        self.cfg = cfg
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, images_seen: int) -> None:
        # One fused lerp over all parameters (torch's own EMA averaging function).
        average = torch.optim.swa_utils.get_ema_multi_avg_fn(ema_beta(self.cfg, images_seen))
        average(list(self.model.parameters()), list(model.parameters()), None)


@dataclass
class TrainingState:
    """Everything a resumed run needs besides the config: weights, EMA, optimizer moments, the position in
    images and steps, and the count of consecutive skipped steps."""

    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    images_seen: int = 0
    step: int = 0
    nan_skips: int = 0

    def state_dict(self, cfg, world_size: int) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "images_seen": self.images_seen,
            "step": self.step,
            "nan_skips": self.nan_skips,
            # The lr schedule is a pure function of images_seen (learning_rate).
            "lr_schedule": {"base_lr": cfg.train.lr, "warmup_images": cfg.train.warmup_images},
            # Where the data stream continues: images seen (indexed sets, cache); shard streams also need the
            # process count, since each process reads its own shards.
            "data_position": self.images_seen,
            "world_size": world_size,
            "rng": {"torch": torch.get_rng_state()},
            "config": to_dict(cfg),
        }

    def load_state_dict(self, state: dict, source: Path) -> None:
        load_weights(self.model, state["model"], f"checkpoint {source}")
        load_weights(self.ema.model, state["ema"], f"checkpoint {source}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.images_seen, self.step, self.nan_skips = state["images_seen"], state["step"], state.get("nan_skips", 0)
        torch.set_rng_state(state["rng"]["torch"])

    def save(self, run_dir: Path, cfg, world_size: int) -> Path:
        """Write ckpt-<images>.pt atomically (with its checksum) and prune old ones; returns the path."""
        path = checkpoint_path(run_dir, self.images_seen)
        atomic_save(self.state_dict(cfg, world_size), path)
        prune_checkpoints(run_dir, cfg.train.keep_checkpoints)
        return path
