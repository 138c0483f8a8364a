"""The training state as small objects (after NVlabs/edm2): the EMA, the lr schedule, and the state that saves
and loads itself. The loop in loop.py only calls them."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from ..checkpoint import atomic_save, check_fits, checkpoint_path, load_sharded, save_sharded
from ..config import to_dict
from ..distributed import Dist


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
    """An exponential moving average of a model's parameters, kept as a frozen copy of the model (sharded like
    the model under FSDP, with an unsharded CPU copy, `plain`, for evaluation on process 0)."""

    def __init__(self, model: nn.Module, cfg):
        self.cfg = cfg
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.plain: nn.Module | None = None

    @torch.no_grad()
    def update(self, model: nn.Module, images_seen: int, keep: torch.Tensor | None = None) -> None:
        # One fused lerp over all parameters (torch's own EMA averaging function); sharded, each process lerps
        # its own shards. keep (a 0/1 tensor): a step skipped on the device leaves the average as it was.
        if keep is None:
            average = torch.optim.swa_utils.get_ema_multi_avg_fn(ema_beta(self.cfg, images_seen))
            average(list(self.model.parameters()), list(model.parameters()), None)
            return
        ema, current = list(self.model.parameters()), list(model.parameters())
        weight = (1 - ema_beta(self.cfg, images_seen)) * keep
        torch._foreach_lerp_(ema, current, [weight] * len(ema))

    @contextlib.contextmanager
    def evaluation_model(self, d, device):
        """The EMA as a plain module on process 0 (None on the others). A sharded EMA is gathered into `plain`
        on the device for the duration: every process must enter."""
        if self.plain is None:
            yield self.model if d.is_main else None
            return
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not d.is_main:
            yield None
            return
        self.plain.load_state_dict(full)
        try:
            yield self.plain.to(device)
        finally:
            self.plain.cpu()


class SkipCounter:
    """Steps skipped for non-finite gradients, counted on the device (no host sync per step): the current run of
    consecutive skips, the skips since the last read, and the images seen when a run first exceeded the limit
    (-1: never). read() brings them to the host, at status lines and checkpoints."""

    def __init__(self, device, consecutive: int = 0):
        self.run = torch.full((), float(consecutive), device=device)
        self.total = torch.zeros((), device=device)
        self.exceeded_at = torch.full((), -1.0, device=device)

    def add(self, skipped: torch.Tensor, images_seen: int, limit: int) -> None:
        self.run = (self.run + skipped) * skipped
        self.total = self.total + skipped
        first = (self.run > limit) & (self.exceeded_at < 0)
        self.exceeded_at = torch.where(first, torch.full_like(self.exceeded_at, float(images_seen)), self.exceeded_at)

    def read(self) -> tuple[int, int, int]:
        """(consecutive skips now, skips since the last read, images when the limit was first exceeded or -1)."""
        run, total, exceeded_at = (int(v) for v in torch.stack([self.run, self.total, self.exceeded_at]).tolist())
        self.total.zero_()
        return run, total, exceeded_at


@dataclass
class TrainingState:
    """Everything a resumed run needs besides the config: weights, EMA, optimizer moments, the position in
    images and steps, and the count of consecutive skipped steps. The optimizer state is keyed by parameter
    name (torch.distributed.checkpoint's state_dict form), so any layout (one process, DDP, FSDP at any process
    count) loads any checkpoint."""

    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    images_seen: int = 0
    step: int = 0
    nan_skips: int = 0
    skips: SkipCounter | None = None  # the device-side count, when the optimizer skips steps on the device

    def meta(self, cfg, world_size: int) -> dict:
        return {
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

    def state_dict(self, cfg, world_size: int) -> dict:
        """The whole state with full tensors on the CPU (a collective when sharded; process 0 gets it)."""
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optimizer_sd = get_state_dict(self.model, self.optimizer, options=full)
        ema_sd = get_model_state_dict(self.ema.model, options=full)
        return {"model": model_sd, "ema": ema_sd, "optimizer": optimizer_sd, **self.meta(cfg, world_size)}

    def load_state_dict(self, state: dict, source: Path, d=None) -> None:
        if state.get("sharded") is not None:  # a DCP folder: read collectively, resharded to this layout
            model_sd, optimizer_sd = get_state_dict(self.model, self.optimizer)
            target = {"model": model_sd, "ema": get_model_state_dict(self.ema.model)}
            target["optimizer"] = {"state": optimizer_sd["state"]}
            load_sharded(target, state["sharded"], d or Dist())
            optimizer_sd = {"state": target["optimizer"]["state"], "param_groups": state["optimizer_param_groups"]}
            set_state_dict(self.model, self.optimizer, model_state_dict=target["model"], optim_state_dict=optimizer_sd)
            set_model_state_dict(self.ema.model, target["ema"])
        else:
            check_fits(self.model, state["model"], f"checkpoint {source}")
            check_fits(self.ema.model, state["ema"], f"checkpoint {source}")
            full = StateDictOptions(full_state_dict=True)
            optimizer_sd = by_name(state["optimizer"], self.model)
            set_state_dict(
                self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=optimizer_sd, options=full
            )
            set_model_state_dict(self.ema.model, state["ema"], options=full)
        self.images_seen, self.step, self.nan_skips = state["images_seen"], state["step"], state.get("nan_skips", 0)
        torch.set_rng_state(state["rng"]["torch"])

    def save(self, run_dir: Path, cfg, d, sharded: bool = False, async_save: bool = False):
        """Write this state as a checkpoint, every process taking part. One file (ckpt-<images>.pt, written by
        process 0 atomically with its checksum) returns its path; a sharded one (ckpt-<images>.dcp, each process
        its shards) returns a PendingCheckpoint to finish()."""
        if sharded:
            model_sd, optimizer_sd = get_state_dict(self.model, self.optimizer)
            tensors = {"model": model_sd, "ema": get_model_state_dict(self.ema.model)}
            tensors["optimizer"] = {"state": optimizer_sd["state"]}
            meta = {**self.meta(cfg, d.world_size), "optimizer_param_groups": optimizer_sd["param_groups"]}
            return save_sharded(tensors, meta, checkpoint_path(run_dir, self.images_seen, True), d, async_save)
        state = self.state_dict(cfg, d.world_size)
        path = checkpoint_path(run_dir, self.images_seen)
        if d.is_main:
            atomic_save(state, path)
        return path


def by_name(optimizer_sd: dict, model: nn.Module) -> dict:
    """An optimizer state keyed by parameter index (torch's own form, older ldmkit checkpoints) -> keyed by
    parameter name; one keyed by name already is returned as it is."""
    if not any(isinstance(k, int) for k in optimizer_sd["state"]):
        groups = optimizer_sd["param_groups"]
        if not groups or all(isinstance(p, str) for g in groups for p in g["params"]):
            return optimizer_sd
    names = [name for name, _ in model.named_parameters()]
    return {
        "state": {names[i]: v for i, v in optimizer_sd["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optimizer_sd["param_groups"]],
    }
