"""Signals to compare runs while they train: a fixed-timestep validation loss and a small-N sample metric.

The validation loss is the training objective of the EMA model on one fixed batch (the held-out digits for
digit runs, else the first eval.val_batch samples of the training data, centre-cropped as stored), at fixed
noise levels eval.val_times with fixed noise, so its curve moves only with the model.
"""

from __future__ import annotations

import torch

from ..conditioning.build import cond_from_batch


def validation_batch(cfg, n: int) -> dict:
    """The fixed batch as a collated sample dict (raw images or cached latents)."""
    from ..config import DataConfig
    from ..data.datasets import build_dataset
    from ..eval.evaluate import digit_data

    dc = cfg.data
    digits = digit_data(cfg)
    if dc.from_cache:
        from ..data.cache import LatentCache

        source = LatentCache(dc.cache)
        return source.__getitems__([(i, i) for i in range(min(n, len(source)))])
    if digits is not None and dc.name == "mnist":
        source = build_dataset(digits, "held_out")
    elif dc.name == "shards":
        from ..data.shards import ShardStream, expand_urls

        plain = DataConfig(**{**dc.__dict__, "hflip": False, "crop": "center", "shuffle_buffer": 1})
        stream = ShardStream(
            expand_urls(dc.path, dc.allow_shell), plain, 0, 0, 1, n, with_labels=cfg.model.conditioning == "class"
        )
        return next(iter(stream))
    else:
        source = build_dataset(DataConfig(**{**dc.__dict__, "hflip": False}), "train")
    return torch.utils.data.default_collate([source[(i, i)] for i in range(min(n, len(source)))])


class Validator:
    def __init__(self, cfg, objective, autoencoder, text_encoder, device):
        self.cfg, self.objective, self.device = cfg, objective, device
        batch = validation_batch(cfg, cfg.eval.val_batch)
        with torch.no_grad():
            if "latent_mean" in batch:
                self.x0 = autoencoder.latents(batch["latent_mean"].to(device), batch["latent_std"].to(device), None)
            else:
                self.x0 = autoencoder.encode(batch["image"].to(device))  # the posterior mean
        B = len(self.x0)
        self.cond = cond_from_batch(cfg, batch, text_encoder, torch.zeros(B, dtype=torch.bool, device=device), device)
        self.noise = torch.randn(self.x0.shape, generator=torch.Generator().manual_seed(20241104)).to(device)

    def times(self, level: float) -> torch.Tensor:
        B = len(self.x0)
        if self.cfg.diffusion.objective == "ddpm":
            steps = self.objective.schedule.num_steps
            return torch.full((B,), round(level * (steps - 1)), dtype=torch.long, device=self.device)
        return torch.full((B,), float(level), device=self.device)

    @torch.no_grad()
    def loss(self, model) -> dict:
        model.eval()
        per_level = {
            f"{t:g}": float(self.objective.loss(model, self.x0, self.cond, self.times(t), self.noise)["loss"].mean())
            for t in self.cfg.eval.val_times
        }
        return {"val_loss": per_level, "val_loss_mean": sum(per_level.values()) / len(per_level)}
