"""WebDataset tar shards in the layout img2dataset writes for CC12M: per sample `{key}.jpg|png` (image),
`{key}.txt` (caption) and `{key}.json` (metadata), shards named `prefix-00000.tar`.

`write_mnist_caption_shards` gives the embedded digits that form ("a handwritten digit seven"), so the
text-to-image path runs offline. `read_shards` streams (image, caption, meta) from local paths or any URL
WebDataset accepts (including `pipe:` commands for object stores); `shards_for_rank` splits the shard list
across processes explicitly, so ranks never overlap.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def digit_caption(label: int) -> str:
    return f"a handwritten digit {DIGIT_WORDS[label]}"


def write_mnist_caption_shards(out_dir: str | Path, data_cfg, split: str = "train", shard_size: int = 1000, prefix: str = "mnist") -> list[Path]:
    """Write the MNIST digits of `split` with captions as shards of `shard_size` samples; returns their paths."""
    import webdataset as wds

    from .datasets import build_dataset

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = build_dataset(data_cfg, split)
    with wds.ShardWriter(str(out_dir / f"{prefix}-%05d.tar"), maxcount=shard_size, verbose=0) as sink:
        for i in range(len(ds)):
            image, label = ds[i]
            pixels = ((image[0].numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            label = int(label)
            sink.write({"__key__": f"{split}{i:07d}", "png": buffer.getvalue(), "txt": digit_caption(label),
                        "json": json.dumps({"label": label, "width": pixels.shape[1], "height": pixels.shape[0]}).encode()})
    return sorted(out_dir.glob(f"{prefix}-*.tar"))


def shards_for_rank(urls: list[str], rank: int, world_size: int) -> list[str]:
    """This process's shards: every world_size-th one, starting at its rank. Needs at least one shard per rank."""
    if len(urls) < world_size:
        raise ValueError(f"{len(urls)} shard(s) cannot be split across {world_size} processes; write more, smaller shards")
    return list(urls)[rank::world_size]


def read_shards(urls: list[str]):
    """Iterate (PIL image, caption, meta dict) over the shards, in order. Samples with an unreadable image
    are skipped (WebDataset's warn_and_continue) rather than stopping the stream."""
    import webdataset as wds

    dataset = wds.WebDataset([str(u) for u in urls], shardshuffle=False, handler=wds.warn_and_continue,
                             nodesplitter=None, empty_check=False)
    for sample in dataset:
        key = next((k for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
        if key is None or "txt" not in sample:
            continue
        try:
            image = Image.open(io.BytesIO(sample[key]))
            image.load()
        except Exception:
            continue
        meta = json.loads(sample["json"]) if "json" in sample else {}
        meta["key"] = sample["__key__"]
        yield image, sample["txt"].decode("utf-8"), meta
