"""The latent cache `ldmkit encode` writes and training reads (data.from_cache: true).

Layout of the cache folder:
- `part-<unit>-b<bucket>.safetensors`: one encoding unit's samples of one bucket (a unit is an input shard, or
  `data.encode_chunk` consecutive images of an image folder). Tensors, N samples:
  `latent_mean`, `latent_std` [N, 2, C, h, w] (posterior moments before scale/shift, of the image and of its
  mirror image, so training can still flip and sample the posterior); `label` [N] (-1 without classes);
  `control.<name>` [N, k] (crop metadata, flip = 0); with a text encoder `text_tokens` [N, L, D],
  `text_mask` [N, L] (uint8), `text_pooled` [N, Dp]. The sample keys are in the file's metadata.
- `part-<unit>.json`: the unit's record (parts, counts, skipped files and why, converted modes); written
  last, so its presence marks a finished unit and an interrupted `encode` redoes only unfinished units.
- `manifest.json`: totals, shapes, buckets, encoder names and versions, skip counts (written at the end).

Reading memory-maps the safetensors files (numpy), so a cache larger than RAM trains without loading it, and
a batch is gathered with one fancy index per part: tens of thousands of samples per second on one core.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from .datasets import DataError, sample_rng, split_item

CACHE_FORMAT = "ldmkit-latent-cache/1"
_NUMPY_DTYPES = {
    "F16": np.float16,
    "BF16": np.uint16,
    "F32": np.float32,
    "I64": np.int64,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def memmap_safetensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    """Memory-map every tensor of a safetensors file: (arrays, dtypes, metadata). BF16 maps as uint16."""
    path = Path(path)
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    metadata = header.pop("__metadata__", {}) or {}
    arrays, dtypes = {}, {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        dtype = _NUMPY_DTYPES[info["dtype"]]
        count = int(np.prod(info["shape"])) if info["shape"] else 1
        if end - begin != count * np.dtype(dtype).itemsize:
            raise DataError(
                f"cache part {path} is corrupt: tensor {name} has {end - begin} bytes for shape {info['shape']}"
            )
        arrays[name] = np.memmap(path, dtype=dtype, mode="r", offset=8 + header_len + begin, shape=tuple(info["shape"]))
        dtypes[name] = info["dtype"]
    return arrays, dtypes, metadata


def _to_torch(array: np.ndarray, dtype: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == "BF16" else tensor


def read_manifest(folder: str | Path) -> dict:
    folder = Path(folder).expanduser()
    path = folder / "manifest.json"
    if not path.is_file():
        raise DataError(
            f"no latent cache at {folder} (manifest.json missing): run 'ldmkit encode CONFIG' first, or finish it"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != CACHE_FORMAT:
        raise DataError(
            f"{path} is not an ldmkit latent cache of format {CACHE_FORMAT} (found {manifest.get('format')!r})"
        )
    return manifest


class LatentCache(torch.utils.data.Dataset):
    """The cached samples, indexed 0..N-1 over all parts (in manifest order). A sample (or a batch, through
    __getitems__, which DataLoader calls with a whole list) holds latent_mean/latent_std [C, h, w] of the
    mirrored or plain image (flip drawn from the sample seed when hflip), label, control (with the flip
    recorded), and the text fields when the cache has them."""

    def __init__(self, folder: str | Path, hflip: bool = False):
        self.folder = Path(folder).expanduser()
        self.manifest = read_manifest(self.folder)
        self.hflip = hflip
        self.parts, counts, buckets = [], [], []
        for part in self.manifest["parts"]:
            path = self.folder / part["file"]
            if not path.is_file():
                raise DataError(f"latent cache {self.folder} lacks part {part['file']} listed in its manifest")
            arrays, dtypes, _ = memmap_safetensors(path)
            self.parts.append((arrays, dtypes))
            counts.append(part["count"])
            buckets.append(part["bucket"])
        if not self.parts:
            raise DataError(f"latent cache {self.folder} holds no samples")
        self.offsets = np.concatenate([[0], np.cumsum(counts)])
        self.bucket_of = np.repeat(np.asarray(buckets, dtype=np.int64), counts)  # [N] bucket of each sample
        labels = np.concatenate([np.asarray(a["label"]) for a, _ in self.parts])
        self.labels = torch.from_numpy(labels)
        self.num_classes = int(labels.max()) + 1 if labels.max() >= 0 else 0
        self.control_names = [k.split(".", 1)[1] for k in self.parts[0][0] if k.startswith("control.")]
        self.has_text = "text_pooled" in self.parts[0][0]

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self):
        # DataLoader workers started by spawn (macOS, Windows) re-map the files instead of receiving copies.
        state = dict(self.__dict__)
        state["parts"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.parts = [memmap_safetensors(self.folder / part["file"])[:2] for part in self.manifest["parts"]]

    def __getitem__(self, item) -> dict:
        batch = self.__getitems__([item])
        return {k: ({n: v[0] for n, v in x.items()} if isinstance(x, dict) else x[0]) for k, x in batch.items()}

    def __getitems__(self, items: list) -> dict:
        """A collated batch for a list of items (index, seed): one gather per part touched."""
        index = np.asarray([split_item(i)[0] for i in items], dtype=np.int64)
        seeds = [split_item(i)[1] for i in items]
        if index.min() < 0 or index.max() >= len(self):
            raise IndexError(f"cache index out of range 0..{len(self) - 1}")
        if len(set(self.bucket_of[index].tolist())) > 1:
            raise DataError(
                "a batch mixes aspect-ratio buckets; use BucketBatches to draw batches from a bucketed cache"
            )
        flips = np.asarray([int(self.hflip and sample_rng(s).random() < 0.5) for s in seeds], dtype=np.int64)
        part_of = np.searchsorted(self.offsets, index, side="right") - 1
        out: dict[str, list] = {}
        order = []
        for p in np.unique(part_of):
            sel = np.flatnonzero(part_of == p)
            rows = index[sel] - self.offsets[p]
            arrays, dtypes = self.parts[p]
            for name, array in arrays.items():
                if name.startswith("latent_"):
                    value = _to_torch(array[rows, flips[sel]], dtypes[name])
                else:
                    value = _to_torch(array[rows], dtypes[name])
                out.setdefault(name, []).append(value)
            order.append(sel)
        inverse = np.argsort(np.concatenate(order))  # back to the order of `items`
        batch = {name: torch.cat(values)[inverse] for name, values in out.items()}
        result = {
            "latent_mean": batch.pop("latent_mean"),
            "latent_std": batch.pop("latent_std"),
            "label": batch.pop("label"),
        }
        control = {
            name.split(".", 1)[1]: batch.pop(name).float() for name in list(batch) if name.startswith("control.")
        }
        control["flip"] = torch.from_numpy(flips).float()[:, None]
        result["control"] = control
        if "text_mask" in batch:
            batch["text_mask"] = batch["text_mask"].bool()
        result.update(batch)
        return result
