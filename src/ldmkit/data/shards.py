"""WebDataset tar shards in the layout img2dataset writes for CC12M: per sample `{key}.jpg|png` (image),
`{key}.txt` (caption) and `{key}.json` (metadata), shards named `prefix-00000.tar`.

`write_mnist_caption_shards` gives the embedded digits that form ("a handwritten digit seven"), so the
text-to-image path runs offline. `tar_records` streams the raw samples of one shard from a local path or any
URL WebDataset's gopen accepts (`pipe:` commands for object stores, http); `shards_for_rank` splits the shard
list across processes explicitly, so ranks never overlap (the stream uses it for every epoch's order).
`ShardStream` is the training stream: a deterministic, resumable order per process (see its docstring).
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .transforms import BadImage, crop_with_metadata, load_image

log = logging.getLogger("ldmkit")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digit_caption(label: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[label]}"


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


# Captions of a two-digit image, short to long (about 6 to 45 tokens); each says which digit is on which side,
# some naming the right one first, so the model must read the caption to place them.
PAIR_TEMPLATES = (
    "{A}, then {B}",
    "{A} to the left of {B}",
    "{B} to the right of {A}",
    "two handwritten digits: {A} on the left and {B} on the right",
    "on the right {B}, on the left {A}, both handwritten in white on black",
    "a black picture with two handwritten digits side by side, {A} written on the left half and {B} on the right half",
    "a small black square showing two white handwritten numbers next to each other, where the number on the left "
    "side is {A} and the number on the right side is {B}, with nothing else anywhere in the picture",
)


def pair_caption(left: int, right: int, style: int) -> str:
    """The caption of a two-digit image in template `style` (mod the number of templates)."""
    template = PAIR_TEMPLATES[style % len(PAIR_TEMPLATES)]
    return template.format(A=_a(DIGIT_WORDS[left]), B=_a(DIGIT_WORDS[right]))


def pair_image(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Two digit images [C, S, S] (background -1) side by side on one [C, S, S] canvas: each shrunk to S/2 and
    centred vertically in its half."""
    import torch.nn.functional as F

    side = left.shape[-1]
    half = side // 2
    small = F.interpolate(torch.stack([left, right]).float(), size=(half, half), mode="bilinear", antialias=True)
    canvas = -torch.ones_like(left, dtype=torch.float32)
    top = (side - half) // 2
    canvas[:, top : top + half, :half], canvas[:, top : top + half, half : 2 * half] = small[0], small[1]
    return canvas


def pair_halves(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The left and right digit [N, C, S/2, S/2] of two-digit images [N, C, S, S] (where pair_image put them)."""
    side = images.shape[-1]
    half = side // 2
    top = (side - half) // 2
    rows = images[..., top : top + half, :]
    return rows[..., :half], rows[..., half : 2 * half]


def write_mnist_caption_shards(
    out_dir: str | Path,
    data_cfg,
    split: str = "train",
    shard_size: int = 1000,
    prefix: str = "mnist",
    layout: str = "single",
) -> list[Path]:
    """Write the MNIST digits of `split` with captions as shards of `shard_size` samples; returns their paths.
    layout "pairs": each digit beside another one (a fixed random partner), captioned by a PAIR_TEMPLATES template
    drawn per sample; its label is 10 x left + right."""
    import webdataset as wds

    from ..config import DataConfig
    from .datasets import build_dataset

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = build_dataset(
        DataConfig(name="mnist", resolution=data_cfg.resolution, channels=1, held_out=data_cfg.held_out), split
    )
    if layout not in ("single", "pairs"):
        raise ValueError(f"unknown caption layout {layout!r} (single or pairs)")
    rng = np.random.default_rng(0)
    partner, styles = rng.permutation(len(ds)), rng.integers(0, len(PAIR_TEMPLATES), len(ds))
    with wds.ShardWriter(str(out_dir / f"{prefix}-%05d.tar"), maxcount=shard_size, verbose=0) as sink:
        for i in range(len(ds)):
            sample = ds[i]
            image, label = sample["image"], int(sample["label"])
            caption, meta = digit_caption(label), {"label": label}
            if layout == "pairs":
                other = ds[int(partner[i])]
                right = int(other["label"])
                image = pair_image(image, other["image"])
                caption, meta = pair_caption(label, right, int(styles[i])), {"label": 10 * label + right}
                meta["digits"] = [label, right]
            pixels = ((image[0].numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            meta.update(width=pixels.shape[1], height=pixels.shape[0])
            sink.write(
                {
                    "__key__": f"{split}{i:07d}",
                    "png": buffer.getvalue(),
                    "txt": caption,
                    "json": json.dumps(meta).encode(),
                }
            )
    return sorted(out_dir.glob(f"{prefix}-*.tar"))


def shards_for_rank(urls: list[str], rank: int, world_size: int) -> list[str]:
    """This process's shards: every world_size-th one, starting at its rank. Needs at least one shard per rank."""
    if len(urls) < world_size:
        raise ValueError(
            f"{len(urls)} shard(s) cannot be split across {world_size} processes; write more, smaller shards"
        )
    return list(urls)[rank::world_size]


def expand_urls(spec: str | list[str], allow_shell: bool = False) -> list[str]:
    """Shard URLs from a brace pattern ('/data/cc12m/{00000..01242}.tar', several joined by '::'), a glob of
    local files, a text file listing one URL per line, or a list of any of these."""
    import glob

    from braceexpand import braceexpand

    if isinstance(spec, (list, tuple)):
        return [u for s in spec for u in expand_urls(s, allow_shell)]
    spec = str(spec)
    local = Path(spec).expanduser()
    if local.is_file() and local.suffix in (".txt", ".list"):
        listed = [line.strip() for line in local.read_text().splitlines() if line.strip() and not line.startswith("#")]
        return check_shell(listed, allow_shell, f"{spec} lists")
    urls = [u for part in spec.split("::") for u in braceexpand(part)]
    if any(ch in spec for ch in "*?[") and not spec.startswith(("pipe:", "http")):
        urls = sorted(glob.glob(str(local)))
    if not urls:
        raise ValueError(f"no shards match {spec!r}")
    return check_shell(urls, allow_shell, "data.path is")


def check_shell(urls: list[str], allow_shell: bool, what: str) -> list[str]:
    """`pipe:CMD` URLs run CMD through a shell: refused unless the config allows it (data.allow_shell)."""
    piped = [u for u in urls if u.startswith("pipe:")]
    if piped and not allow_shell:
        raise ValueError(
            f"{what} a 'pipe:' URL ({piped[0][:80]}), which runs a shell command; set data.allow_shell: true "
            "if you trust it (docs/data.md)"
        )
    return urls


def tar_records(url: str):
    """The samples of one tar shard, in file order, as dicts {'__key__', '__url__', ext: bytes}. Files
    belong to the sample named by their path up to the first dot of the file name (WebDataset's rule). A
    truncated or unreadable tar ends the shard with a warning instead of stopping the stream."""
    from webdataset.gopen import gopen

    current: dict | None = None
    try:
        with gopen(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, _, name = member.name.rpartition("/")
                if name.startswith(".") or "." not in name:
                    continue
                stem, ext = name.split(".", 1)
                key = f"{folder}/{stem}" if folder else stem
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                current[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        log.warning("shard %s ends early (%s: %s)", url, type(e).__name__, e)
    if current is not None:
        yield current


def record_caption(record: dict) -> str:
    return record["txt"].decode("utf-8", errors="replace").strip() if "txt" in record else ""


def record_label(record: dict, label_field: str | None) -> int:
    """The class id from the sample's JSON (label_field), or -1 for text-only data."""
    if not label_field:
        return -1
    try:
        return int(json.loads(record["json"])[label_field])
    except (KeyError, ValueError, TypeError):
        raise BadImage(f"no integer '{label_field}' in its json") from None


def record_image(record: dict, channels: int, min_size: int):
    key = next((k for k in IMAGE_KEYS if k in record), None)
    if key is None:
        raise BadImage("no image file")
    return load_image(record[key], channels, min_size)


def shuffled(records, buffer_size: int, rng: np.random.Generator):
    """A seeded shuffle buffer: the order depends only on the input order and the generator."""
    buffer = []
    for record in records:
        buffer.append(record)
        if len(buffer) >= buffer_size:
            i = int(rng.integers(len(buffer)))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()
    while buffer:
        i = int(rng.integers(len(buffer)))
        buffer[i], buffer[-1] = buffer[-1], buffer[i]
        yield buffer.pop()


class ShardStream(torch.utils.data.IterableDataset):
    """This process's micro-batches from WebDataset shards, for training from raw images.

    Order: epoch e permutes the shard list with (seed, e); process `rank` reads every world-th shard of that
    order, through a shuffle buffer seeded by (seed, e, rank); epochs follow each other without a gap. Sample
    number p of this process's stream belongs to micro-batch p // micro; DataLoader worker w of W decodes
    only the micro-batches k with k % W == w (each worker reads the tar bytes, decoding is what costs), so
    the batches arrive in stream order whatever the worker count. Resuming at `start` (= images seen / world,
    restored from the checkpoint) skips the first `start` samples without decoding them: no sample repeats
    or goes missing. An undecodable sample is replaced by another sample of its micro-batch and logged.
    The order depends on the number of processes (shards are split by rank): resume with the same count.
    """

    def __init__(
        self,
        urls: list[str],
        data_cfg,
        seed: int,
        rank: int,
        world_size: int,
        micro: int,
        start: int = 0,
        with_labels: bool = False,
    ):
        shards_for_rank(urls, rank, world_size)  # enough shards for every process
        self.urls, self.cfg, self.seed = [str(u) for u in urls], data_cfg, seed
        self.rank, self.world_size, self.micro, self.start = rank, world_size, micro, start
        self.label_field = data_cfg.label_field if with_labels else None

    def records(self):
        """(position, record) of this process's endless stream."""
        position, epoch = 0, 0
        while True:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))
            mine = shards_for_rank([self.urls[i] for i in order], self.rank, self.world_size)
            rng = np.random.default_rng([self.seed, epoch, self.rank])
            before = position
            for record in shuffled((r for url in mine for r in tar_records(url)), self.cfg.shuffle_buffer, rng):
                yield position, record
                position += 1
            if position == before:
                raise ValueError(f"shards {mine[:3]}... of process {self.rank} hold no samples")
            epoch += 1

    def sample(self, record: dict, position: int) -> dict:
        cfg = self.cfg
        image, _ = record_image(record, cfg.channels, cfg.min_side_px)
        label = record_label(record, self.label_field)
        rng = np.random.default_rng([self.seed, self.rank, position])
        image, meta = crop_with_metadata(
            image,
            cfg.resolution,
            cfg.crop,
            rng,
            0.5 if cfg.hflip else 0.0,
            tuple(cfg.crop_scale),
            tuple(cfg.crop_ratio),
        )
        from .datasets import control_tensors, pil_to_tensor

        return {
            "image": pil_to_tensor(image),
            "label": torch.tensor(label),
            "caption": record_caption(record),
            "key": record["__key__"],
            "control": control_tensors(meta),
        }

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        batch, last_good = [], None
        for position, record in self.records():
            if position < self.start or (position // self.micro) % workers != worker:
                continue
            try:
                batch.append(self.sample(record, position))
                last_good = batch[-1]
            except BadImage as e:
                log.warning("skipping sample %s of %s: %s", record.get("__key__"), record.get("__url__"), e)
                batch.append(None)
            if len(batch) == self.micro:
                good = [s for s in batch if s is not None] or ([last_good] if last_good is not None else [])
                if not good:
                    raise ValueError("no decodable sample in a whole micro-batch of the shards; check the data")
                batch = [s if s is not None else good[i % len(good)] for i, s in enumerate(batch)]
                yield torch.utils.data.default_collate(batch)
                batch = []
