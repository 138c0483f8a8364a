"""`ldmkit encode CONFIG`: precompute VAE posterior moments (image and mirror image) and text embeddings into
the latent cache (layout: ldmkit.data.cache).

Work is cut into units (one per input shard, or `data.encode_chunk` images of a folder or of the digits);
process `rank` of `world` takes units rank, rank + world, ... so processes never write the same file, and a
unit whose record (`part-<unit>.json`) exists is done: re-running the command continues an interrupted run.
DataLoader workers decode images (each worker whole units); the main process runs the encoders in batches.
Unusable images (corrupt, truncated, too small, no image file) are skipped and counted with the reason;
grayscale, CMYK, palette and alpha images are converted to RGB and counted. Process 0 writes manifest.json
once every unit is done (whichever process finishes the last unit writes it; no process group is needed).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..data.cache import CACHE_FORMAT
from ..data.datasets import ImageFolder, balanced_split, mnist_digits, pil_to_tensor
from ..data.shards import expand_urls, record_caption, record_image, record_label, tar_records
from ..data.transforms import BadImage, crop_with_metadata, load_image, nearest_bucket

MAX_LISTED_SKIPS = 1000  # the manifest lists this many skipped files by name; all are counted


def encoding_units(cfg, folder: ImageFolder | None = None) -> list[dict]:
    """The units of work, in a fixed order: {'name', 'kind', 'source'} (folder: the listed image folder)."""
    dc = cfg.data
    if dc.name == "shards":
        return [
            {"name": f"{i:06d}", "kind": "shard", "source": url}
            for i, url in enumerate(expand_urls(dc.path, dc.allow_shell))
        ]
    count = len(folder) if dc.name == "image_folder" else 5000 - dc.held_out
    return [
        {"name": f"{i // dc.encode_chunk:06d}", "kind": "range", "source": [i, min(i + dc.encode_chunk, count)]}
        for i in range(0, count, dc.encode_chunk)
    ]


class UnitSamples(torch.utils.data.IterableDataset):
    """Decoded, cropped samples of the given units, then one end-of-unit record per unit (its counts).
    Worker w of W handles units w, w + W, ..."""

    def __init__(self, cfg, units: list[dict], with_labels: bool, folder: ImageFolder | None = None):
        self.cfg, self.units, self.with_labels, self.folder = cfg, units, with_labels, folder

    def raw_records(self, unit):
        """(key, image source or tensor, label, caption) of a unit."""
        dc = self.cfg.data
        if unit["kind"] == "shard":
            for record in tar_records(unit["source"]):
                yield record["__key__"], record, None, record_caption(record)
        elif dc.name == "image_folder":
            folder = self.folder
            for i in range(*unit["source"]):
                yield (
                    str(folder.files[i].relative_to(Path(dc.path).expanduser())),
                    folder.files[i],
                    int(folder.labels[i]),
                    "",
                )
        else:
            images, labels = self._digits()
            for i in range(*unit["source"]):
                yield f"train{i:07d}", images[i], int(labels[i]), ""

    def _digits(self):
        if not hasattr(self, "_digits_cache"):
            images, labels = mnist_digits(self.cfg.data.resolution)
            train, _ = balanced_split(labels, self.cfg.data.held_out, 10)
            self._digits_cache = (images[train], labels[train])
        return self._digits_cache

    def decode(self, source, seed: int):
        """-> (image tensor [C, h, w] in [-1, 1], control dict, bucket, converted mode or None), or BadImage."""
        dc = self.cfg.data
        if isinstance(source, torch.Tensor):  # the digits: already at resolution, original 28x28
            meta = {
                "original_size": [28.0, 28.0],
                "crop_top_left": [0.0, 0.0],
                "crop_size": [28.0, 28.0],
                "target_size": [float(source.shape[1]), float(source.shape[2])],
                "aspect_ratio": [1.0],
                "flip": [0.0],
            }
            return source, meta, 0, None
        if isinstance(source, dict):
            image, converted = record_image(source, dc.channels, dc.min_side_px)
        else:
            image, converted = load_image(source, dc.channels, dc.min_side_px)
        bucket = nearest_bucket(image.size[1], image.size[0], dc.buckets) if dc.buckets else 0
        target = tuple(dc.buckets[bucket]) if dc.buckets else dc.resolution
        # Flips are left to training (both are cached); the crop is drawn once, here, from the sample's seed.
        image, meta = crop_with_metadata(
            image, target, dc.crop, np.random.default_rng(seed), 0.0, tuple(dc.crop_scale), tuple(dc.crop_ratio)
        )
        return pil_to_tensor(image), meta.as_control(), bucket, converted

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for unit in self.units[worker::workers]:
            skipped, converted = [], Counter()
            for n, (key, source, label, caption) in enumerate(self.raw_records(unit)):
                try:
                    if self.with_labels and unit["kind"] == "shard":
                        label = record_label(source, self.cfg.data.label_field)
                    image, control, bucket, mode = self.decode(
                        source, seed=hash_seed(self.cfg.train.seed, unit["name"], n)
                    )
                except BadImage as e:
                    skipped.append({"key": key, "reason": str(e)})
                    continue
                if mode is not None:
                    converted[mode] += 1
                yield {
                    "unit": unit["name"],
                    "key": key,
                    "image": image,
                    "label": -1 if label is None else label,
                    "caption": caption,
                    "control": control,
                    "bucket": bucket,
                }
            yield {"unit": unit["name"], "end": True, "skipped": skipped, "converted": dict(converted)}


def hash_seed(seed: int, unit: str, n: int) -> list[int]:
    return [seed, int(unit), n]


class UnitWriter:
    """Collects one unit's encoded samples per bucket and writes its parts and record atomically."""

    def __init__(self, out: Path, name: str, dtype: torch.dtype):
        self.out, self.name, self.dtype = out, name, dtype
        self.buckets: dict[int, dict[str, list]] = {}

    def add(self, bucket: int, tensors: dict[str, torch.Tensor], keys: list[str]):
        store = self.buckets.setdefault(bucket, {"keys": []})
        store["keys"] += keys
        for name, value in tensors.items():
            store.setdefault(name, []).append(value)

    def finish(self, skipped: list, converted: dict, source: str) -> dict:
        from safetensors.torch import save_file

        parts = []
        for bucket, store in sorted(self.buckets.items()):
            keys = store.pop("keys")
            tensors = {}
            for name, values in store.items():
                value = torch.cat(values)
                if value.is_floating_point() and not name.startswith("control.") and name != "label":
                    value = value.to(self.dtype)
                tensors[name] = value.contiguous()
            file = f"part-{self.name}-b{bucket}.safetensors"
            tmp = self.out / (file + ".tmp")
            save_file(tensors, str(tmp), metadata={"keys": json.dumps(keys), "bucket": str(bucket)})
            os.replace(tmp, self.out / file)
            parts.append(
                {
                    "file": file,
                    "count": len(keys),
                    "bucket": bucket,
                    "latent_shape": list(tensors["latent_mean"].shape[2:]),
                }
            )
        record = {
            "unit": self.name,
            "source": source,
            "parts": parts,
            "count": sum(p["count"] for p in parts),
            "skipped": skipped,
            "converted": converted,
        }
        tmp = self.out / f"part-{self.name}.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, self.out / f"part-{self.name}.json")  # last: marks the unit as done
        return record


def encode_dataset(cfg, batch_size: int = 64, log=print, stop_after_units: int | None = None) -> Path | None:
    """Encode the configured data into cfg.data.cache. Returns the manifest path when this process completed
    the cache, else None.
        stop_after_units (tests) stops this process after that many units, as an interruption would."""
    from .. import distributed
    from ..autoencoders import build_autoencoder
    from ..conditioning.build import build_text_encoder
    from ..config import ConfigError, dump_config

    dc = cfg.data
    if not dc.cache:
        raise ConfigError("config key 'data.cache': where should 'ldmkit encode' write the cache?")
    d = distributed.init_distributed(cfg.train.device, process_group=False)
    out = Path(dc.cache).expanduser()
    manifest_path = out / "manifest.json"
    out.mkdir(parents=True, exist_ok=True)
    if d.is_main:
        dump_config(cfg, out / "encode_config.yaml")
    # An image folder is listed once, here; DataLoader workers inherit the listing.
    folder = ImageFolder(dc.path, dc.resolution, dc.channels, dc.class_index) if dc.name == "image_folder" else None
    units = encoding_units(cfg, folder)

    def is_done(unit):
        return (out / f"part-{unit['name']}.json").exists()

    mine = [u for u in units[d.rank :: d.world_size] if not is_done(u)]
    if stop_after_units is not None:
        mine = mine[:stop_after_units]
    autoencoder = build_autoencoder(cfg.autoencoder, dc.channels).to(d.device)
    text_encoder = build_text_encoder(cfg, d.device) if dc.name == "shards" else None
    dtype = getattr(torch, dc.cache_dtype)
    with_labels = dc.name != "shards" or bool(dc.label_field)
    done = sum(map(is_done, units)) if d.world_size == 1 else None
    if d.is_main:
        log(
            f"encoding {len(units)} unit(s) into {out}: {sum(map(is_done, units))} already done, {d.world_size} "
            "process(es)"
        )

    loader = torch.utils.data.DataLoader(
        UnitSamples(cfg, mine, with_labels, folder),
        batch_size=None,
        num_workers=min(dc.num_workers, len(mine)),
        collate_fn=lambda x: x,
    )
    writers: dict[str, UnitWriter] = {}
    pending: dict[tuple[str, int], list[dict]] = {}
    t0, encoded = time.time(), 0

    def flush(unit: str, bucket: int):
        nonlocal encoded
        samples = pending.pop((unit, bucket), [])
        if not samples:
            return
        images = torch.stack([s["image"] for s in samples]).to(d.device)
        with torch.no_grad():
            mean, std = autoencoder.moments(images)
            mean_flip, std_flip = autoencoder.moments(images.flip(-1))
        tensors = {
            "latent_mean": torch.stack([mean, mean_flip], 1).cpu(),  # [N, 2, C, h, w]
            "latent_std": torch.stack([std, std_flip], 1).cpu(),
            "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        }
        for name in samples[0]["control"]:
            tensors[f"control.{name}"] = torch.tensor([s["control"][name] for s in samples], dtype=torch.float32)
        if text_encoder is not None:
            text = text_encoder([s["caption"] for s in samples])
            tensors.update(
                text_tokens=text.tokens.cpu(), text_mask=text.mask.to(torch.uint8).cpu(), text_pooled=text.pooled.cpu()
            )
        writers.setdefault(unit, UnitWriter(out, unit, dtype)).add(bucket, tensors, [s["key"] for s in samples])
        encoded += len(samples)

    if mine:
        sources = {u["name"]: str(u["source"]) for u in mine}
        for item in loader:
            unit = item["unit"]
            if item.get("end"):
                for u, b in [k for k in pending if k[0] == unit]:
                    flush(u, b)
                record = writers.pop(unit, UnitWriter(out, unit, dtype)).finish(
                    item["skipped"], item["converted"], sources[unit]
                )
                if done is not None:
                    done += 1
                log(
                    f"unit {unit}: {record['count']} encoded, {len(record['skipped'])} skipped"
                    + (f" ({done}/{len(units)} units)" if done is not None else "")
                    + f", {encoded / max(time.time() - t0, 1e-9):.0f} img/s"
                )
                continue
            pending.setdefault((unit, item["bucket"]), []).append(item)
            if len(pending[(unit, item["bucket"])]) >= batch_size:
                flush(unit, item["bucket"])

    missing = [u["name"] for u in units if not is_done(u)]
    if missing:
        if d.world_size == 1 or stop_after_units is not None:
            log(f"{len(missing)} unit(s) not done yet (e.g. {missing[0]}); run the same command again to finish")
        return None  # other processes are still working; the last to finish writes the manifest
    manifest = write_manifest(cfg, out, units, autoencoder, text_encoder)
    log(
        f"cache complete: {manifest['count']:,} samples, {sum(manifest['skipped'].values()):,} skipped "
        f"({', '.join(f'{k}: {v}' for k, v in manifest['skipped'].items()) or 'none'}), manifest {manifest_path}"
    )
    return manifest_path


def write_manifest(cfg, out: Path, units: list[dict], autoencoder, text_encoder) -> dict:
    import diffusers
    import transformers

    from .. import __version__

    records = [json.loads((out / f"part-{u['name']}.json").read_text()) for u in units]
    parts = [p for r in records for p in r["parts"]]
    skipped = Counter(s["reason"].split(" (")[0] for r in records for s in r["skipped"])
    converted = Counter()
    for r in records:
        converted.update(r["converted"])
    shapes = sorted({tuple(p["latent_shape"]) for p in parts})
    dc, ae = cfg.data, cfg.autoencoder
    manifest = {
        "format": CACHE_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "ldmkit_version": __version__,
        "source": {
            "name": dc.name,
            "path": dc.path,
            "class_index": dc.class_index,
            "label_field": dc.label_field,
            "resolution": dc.resolution,
            "channels": dc.channels,
            "crop": dc.crop,
            "min_side": dc.min_side_px,
            "buckets": dc.buckets,
            "seed": cfg.train.seed,
        },
        "count": sum(p["count"] for p in parts),
        "latent_shape": list(shapes[0]) if len(shapes) == 1 else None,
        "latent_shapes": [list(s) for s in shapes],
        "dtype": dc.cache_dtype,
        "autoencoder": {
            "name": ae.name,
            "path": ae.path,
            "subfolder": ae.subfolder,
            "layout": ae.layout,
            "latent_channels": autoencoder.latent_channels,
            "downsample": autoencoder.downsample,
            "stored": "posterior mean and std before scale/shift, [image, mirror image]",
            "diffusers_version": diffusers.__version__,
        },
        "text_encoder": None
        if text_encoder is None
        else {
            "name": text_encoder.name,
            "kind": text_encoder.kind,
            "max_length": text_encoder.max_length,
            "token_dim": text_encoder.token_dim,
            "pooled_dim": text_encoder.pooled_dim,
            "transformers_version": transformers.__version__,
        },
        "parts": parts,
        "skipped": dict(skipped),
        "skipped_files": [dict(s, unit=r["unit"]) for r in records for s in r["skipped"]][:MAX_LISTED_SKIPS],
        "converted": dict(converted),
    }
    if manifest["latent_shape"] is None:
        manifest["latent_shape"] = list(shapes[0])  # channels are what training checks; sizes vary by bucket
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")
    return manifest
