"""Run logs: JSONL (one record per log interval), TensorBoard, optional Weights & Biases, a status line, and the
loss-curve PNG."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import yaml

from ..config import ConfigError
from ..eval.report import read_log

LOG_FILES = ("log.jsonl", "eval.jsonl")


def truncate_logs(run_dir: Path, images: int) -> None:
    """Drop the records past `images` (written after the checkpoint a run resumes from), so curves stay monotonic."""
    for name in LOG_FILES:
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        lines = path.read_text().splitlines()
        kept = [line for line in lines if line.strip() and _record_images(line) <= images]
        if len(kept) != len(lines):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)


def _record_images(line: str) -> float:
    try:
        return json.loads(line).get("images", 0)
    except (json.JSONDecodeError, AttributeError):  # a line cut by a kill: dropped
        return float("inf")


# Record fields that are not curves: the x axis, wall-clock stamps and constants.
NOT_SCALARS = ("images", "step", "time", "processes", "interval_s")


class RunLogger:
    """log.jsonl / eval.jsonl, TensorBoard (scalars, the config as text, sample grids) and, when train.wandb.project
    is set, Weights & Biases. resume_at: the images of the checkpoint a run resumes from; later records (logs and
    TensorBoard events) are dropped first."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_at: int | None = None,
        config: dict | None = None,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "log.jsonl"
        self.tb = self.wandb = None
        if enabled and resume_at is not None:
            truncate_logs(run_dir, resume_at)
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = None if resume_at is None else resume_at + 1  # events at steps >= purge are dropped
                self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)
            except ImportError:  # tensorboard is a dependency, but a missing one should not stop training
                self.tb = None
            if self.tb is not None and config is not None:
                text = yaml.safe_dump(config, sort_keys=False)
                self.tb.add_text("config", "    " + text.replace("\n", "\n    "), resume_at or 0)  # as code
        wandb_cfg = (config or {}).get("train", {}).get("wandb") or {}
        if enabled and wandb_cfg.get("project"):
            self.wandb = start_wandb(Path(run_dir), config, wandb_cfg)

    def log(self, record: dict, file: str = "log.jsonl") -> None:
        """Append record to file (log.jsonl: training status; eval.jsonl: validation loss and small-N metrics)
        and its numbers (nested dicts flattened as key/sub) to TensorBoard and wandb."""
        if not self.enabled:
            return
        with open(self.path.parent / file, "a") as f:
            f.write(json.dumps(record) + "\n")
        flat = {}
        for key, value in record.items():
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for sub, v in items:
                flat[f"{key}/{sub}" if sub is not None else key] = v
        scalars = {
            k: v
            for k, v in flat.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in NOT_SCALARS
        }
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, record["images"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["images"])

    def image(self, tag: str, path: Path, images: int) -> None:
        """A saved PNG (a sample grid) into TensorBoard and wandb at `images` seen."""
        if not self.enabled or (self.tb is None and self.wandb is None):
            return
        import numpy as np
        from PIL import Image

        pixels = np.asarray(Image.open(path).convert("RGB"))
        if self.tb is not None:
            self.tb.add_image(tag, pixels, images, dataformats="HWC")
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({tag: self.wandb.Image(pixels)}, step=images)

    def close(self):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def check_wandb(cfg) -> None:
    """train.wandb.project needs the wandb package: one line before training starts, not a crash later."""
    if cfg.train.wandb.project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError(
                "config key 'train.wandb.project': Weights & Biases logging needs the wandb package "
                "(pip install wandb), or remove train.wandb"
            ) from None


def start_wandb(run_dir: Path, config: dict, wandb_cfg: dict):
    """wandb.init for this run folder; a resumed run continues the same wandb run (its id is kept in the folder)."""
    import wandb

    id_file = run_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
    id_file.write_text(run_id + "\n")
    wandb.init(
        project=wandb_cfg["project"],
        entity=wandb_cfg.get("entity"),
        mode=wandb_cfg.get("mode", "online"),
        dir=str(run_dir),
        name=config.get("name"),
        config=config,
        id=run_id,
        resume="allow",
    )
    return wandb


def status_line(images: int, total: int, loss: float, images_per_s: float, memory_gb: float | None) -> str:
    eta = max(total - images, 0) / max(images_per_s, 1e-9)
    mem = f"  mem {memory_gb:.2f} GB" if memory_gb is not None else ""
    return (
        f"images {images:>10,}/{total:,} ({100 * images / total:5.1f}%)  loss {loss:.4f}  "
        f"{images_per_s:8.1f} img/s  eta {format_duration(eta)}{mem}"
    )


def format_duration(seconds: float) -> str:
    """H:MM:SS, with days when longer (a week-long run's ETA must not wrap at 24 hours)."""
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86_400)
    text = time.strftime("%H:%M:%S", time.gmtime(rest))
    return f"{days}d {text}" if days else text


def print_status(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def plot_loss_curve(run_dir: Path, out: Path | None = None) -> Path | None:
    """Loss against images seen from log.jsonl, written as a PNG."""
    records = read_log(run_dir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out or Path(run_dir) / "loss.png")
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    images = [r["images"] for r in records]
    ax.plot(images, [r["loss"] for r in records], label="loss")
    if any(abs(r["loss"] - r.get("mse", r["loss"])) > 1e-12 for r in records):  # DDPM hybrid: mse is a part of loss
        ax.plot(images, [r["mse"] for r in records], label="mse (L_simple)")
    ax.set_xlabel("images seen")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(Path(run_dir).name)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
