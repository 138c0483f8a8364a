"""Checkpoints: full training state, written atomically, found again by re-running the same command."""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import torch.nn as nn

CKPT_PATTERN = re.compile(r"ckpt-(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used here, reported as one line."""


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash leaves the old file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_path(run_dir: Path, images_seen: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"ckpt-{images_seen:010d}.pt"


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if CKPT_PATTERN.search(p.name)), key=lambda p: int(CKPT_PATTERN.search(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def load_weights(model: nn.Module, state_dict: dict, source: str) -> None:
    """Strict load with a one-line error naming the first tensor that does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or mismatched:
        if mismatched:
            k = mismatched[0]
            detail = f"tensor '{k}' has shape {list(state_dict[k].shape)} there and {list(own[k].shape)} here"
        elif missing:
            detail = f"tensor '{missing[0]}' is missing ({len(missing)} missing)"
        else:
            detail = f"tensor '{unexpected[0]}' is not in this model ({len(unexpected)} unexpected)"
        raise CheckpointError(f"{source} does not fit this model (another architecture?): {detail}")
    model.load_state_dict(state_dict)
