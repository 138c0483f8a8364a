"""WebDataset shards of the captioned digits: written, read back, split across ranks without overlap."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from ldmkit.config import load_config
from ldmkit.data.datasets import build_dataset
from ldmkit.data.shards import (
    BadImage,
    digit_caption,
    record_caption,
    record_image,
    shards_for_rank,
    tar_records,
    write_mnist_caption_shards,
)


def read_shards(urls: list, channels: int | None = None):
    """(PIL image, caption, meta dict) of every sample of the shards, in order; undecodable images skipped."""
    for url in urls:
        for record in tar_records(str(url)):
            try:
                image, _ = record_image(record, channels, 0)
            except BadImage:
                continue
            meta = json.loads(record["json"]) if "json" in record else {}
            meta["key"] = record["__key__"]
            yield image, record_caption(record), meta


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    cfg = load_config()
    return write_mnist_caption_shards(tmp_path_factory.mktemp("shards"), cfg.data, "held_out", shard_size=120), cfg


@pytest.mark.slow
def test_written_in_img2dataset_layout_and_read_back(shards):
    paths, cfg = shards
    assert [p.name for p in paths] == [f"mnist-{i:05d}.tar" for i in range(5)]  # 500 held-out digits / 120
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
    assert set(names[:3]) == {"held_out0000000.png", "held_out0000000.txt", "held_out0000000.json"}
    samples = list(read_shards(paths))
    assert len(samples) == 500
    ds = build_dataset(cfg.data, "held_out")
    for i in (0, 123, 499):
        image, caption, meta = samples[i]
        label = int(ds.labels[i])
        assert caption == digit_caption(label)
        assert meta["label"] == label
        assert meta["key"] == f"held_out{i:07d}"
        expected = ((ds.images[i, 0].numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        assert np.array_equal(np.asarray(image), expected)  # PNG is lossless


def test_ranks_read_disjoint_shards_covering_everything(shards):
    paths, _ = shards
    keys = [set(m["key"] for _, _, m in read_shards(shards_for_rank(paths, r, 2))) for r in range(2)]
    assert not keys[0] & keys[1]
    assert len(keys[0] | keys[1]) == 500
    with pytest.raises(ValueError, match="cannot be split across 8 processes"):
        shards_for_rank(paths, 0, 8)


def test_a_corrupt_sample_is_skipped(tmp_path):
    path = tmp_path / "bad-00000.tar"
    with tarfile.open(path, "w") as tar:
        for key, payload in (("a", b"not a png"), ("b", None)):
            if payload is None:
                buf = io.BytesIO()
                from PIL import Image

                Image.new("L", (8, 8)).save(buf, format="PNG")
                payload = buf.getvalue()
            for ext, data in (("png", payload), ("txt", b"caption " + key.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    samples = list(read_shards([path]))
    assert [c for _, c, _ in samples] == ["caption b"]


def test_captions():
    assert digit_caption(7) == "a handwritten digit seven"
    assert digit_caption(0) == "a handwritten digit zero"


def stream_keys(stream, batches):
    it = iter(stream)
    return [k for _ in range(batches) for k in next(it)["key"]]


def shard_cfg(**kw):
    return load_config(
        overrides=[
            "data.name=shards",
            "data.path=unused",
            "data.label_field=label",
            "data.crop=random",
            "data.hflip=true",
            "data.shuffle_buffer=30",
        ]
        + [f"data.{k}={v}" for k, v in kw.items()]
    ).data


def test_shard_stream_is_deterministic_resumable_and_worker_independent(shards):
    import torch

    from ldmkit.data.shards import ShardStream

    paths, _ = shards
    cfg = shard_cfg()
    full = ShardStream(paths, cfg, seed=0, rank=0, world_size=1, micro=8)
    keys = stream_keys(full, 70)  # 560 samples: past the end of the first epoch (500)
    assert sorted(keys[:500]) == sorted(f"held_out{i:07d}" for i in range(500))  # each sample once per epoch
    assert keys[500:560] != keys[:60]  # the next epoch is reshuffled
    resumed = ShardStream(paths, cfg, seed=0, rank=0, world_size=1, micro=8, start=96)
    assert stream_keys(resumed, 10) == keys[96:176]  # no sample repeated or skipped
    a, b = next(iter(full)), next(iter(ShardStream(paths, cfg, 0, 0, 1, 8)))
    assert torch.equal(a["image"], b["image"])
    assert all(torch.equal(a["control"][k], b["control"][k]) for k in a["control"])
    workers = torch.utils.data.DataLoader(ShardStream(paths, cfg, 0, 0, 1, 8), batch_size=None, num_workers=2)
    batches = [batch for _, batch in zip(range(10), workers)]
    assert [k for b in batches for k in b["key"]] == keys[:80]
    first = next(iter(full))
    assert torch.equal(batches[0]["image"], first["image"])  # same crops and flips in a worker
    flips = torch.cat([b["control"]["flip"] for b in batches])
    assert 0 < flips.sum() < len(flips)  # both flipped and plain samples


def test_shard_stream_splits_ranks_and_replaces_corrupt_samples(shards, tmp_path, caplog):
    from ldmkit.data.shards import ShardStream

    paths, _ = shards
    cfg = shard_cfg()
    per_rank = [set(stream_keys(ShardStream(paths, cfg, 0, r, 2, 10), 20)) for r in range(2)]
    assert not per_rank[0] & per_rank[1]
    with pytest.raises(ValueError, match="cannot be split across 8 processes"):
        ShardStream(paths, cfg, 0, 0, 8, 10)

    bad = tmp_path / "bad-00000.tar"
    with tarfile.open(bad, "w") as tar:
        for i in range(4):
            buf = io.BytesIO()
            from PIL import Image

            Image.new("L", (30, 30), 40 * i).save(buf, format="PNG")
            payload = buf.getvalue() if i != 2 else b"broken"
            for ext, data in (("png", payload), ("txt", f"caption {i}".encode()), ("json", b'{"label": 1}')):
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    batch = next(iter(ShardStream([bad], shard_cfg(shuffle_buffer=1, hflip="false"), 0, 0, 1, 4)))
    assert batch["key"] == ["s0", "s1", "s3", "s3"]  # the broken sample is replaced by another of its micro-batch
    assert "s2" in caplog.text
    assert "corrupt" in caplog.text


def test_shard_urls_from_patterns_lists_globs_and_pipes(shards, tmp_path):
    from ldmkit.data.shards import expand_urls, tar_records

    paths, _ = shards
    folder = paths[0].parent
    assert expand_urls(f"{folder}/mnist-{{00000..00004}}.tar") == [str(p) for p in paths]
    assert expand_urls(f"{folder}/mnist-0000[0-1].tar") == [str(p) for p in paths[:2]]
    assert expand_urls(f"{folder}/mnist-00000.tar::{folder}/mnist-{{00003..00004}}.tar") == [
        str(paths[i]) for i in (0, 3, 4)
    ]
    (tmp_path / "urls.txt").write_text(f"# CC12M\n{paths[1]}\npipe:cat {paths[2]}\n")
    assert expand_urls(tmp_path / "urls.txt", allow_shell=True) == [str(paths[1]), f"pipe:cat {paths[2]}"]
    # without data.allow_shell a pipe: URL is refused, listed or given directly
    with pytest.raises(ValueError, match="allow_shell"):
        expand_urls(tmp_path / "urls.txt")
    with pytest.raises(ValueError, match="allow_shell"):
        expand_urls(f"pipe:cat {paths[2]}")
    # a pipe: command streams the same samples as the file (how object stores are read)
    assert [r["__key__"] for r in tar_records(f"pipe:cat {paths[2]}")] == [
        r["__key__"] for r in tar_records(str(paths[2]))
    ]
    with pytest.raises(ValueError, match="no shards match"):
        expand_urls(f"{folder}/nothing-*.tar")


def test_digit_pair_shards_caption_which_digit_is_where(tmp_path):
    """layout pairs: two real digits side by side, label 10 x left + right, and captions of very different lengths
    that name both digits with their sides (some the right one first)."""
    from ldmkit.config import DataConfig
    from ldmkit.data.shards import DIGIT_WORDS, PAIR_TEMPLATES, pair_caption, pair_halves

    paths = write_mnist_caption_shards(
        tmp_path, DataConfig(resolution=32, held_out=500), "held_out", 250, layout="pairs"
    )
    records = [r for p in paths for r in tar_records(str(p))]
    assert len(records) == 500
    meta = [json.loads(r["json"]) for r in records]
    assert all(m["label"] == 10 * m["digits"][0] + m["digits"][1] for m in meta)
    digits = build_dataset(DataConfig(name="mnist", resolution=32, channels=1, held_out=500), "held_out")
    assert [m["digits"][0] for m in meta] == [int(label) for label in digits.labels]  # the left one is sample i
    for r, m in zip(records[:50], meta):
        caption = r["txt"].decode()
        left, right = (DIGIT_WORDS[d] for d in m["digits"])
        assert left in caption and right in caption
        assert caption in {pair_caption(*m["digits"], style) for style in range(len(PAIR_TEMPLATES))}
    words = [len(pair_caption(3, 8, style).split()) for style in range(len(PAIR_TEMPLATES))]
    assert min(words) <= 5 and max(words) >= 35  # short and long captions: where padding matters
    image = torch.from_numpy(np.array(Image.open(io.BytesIO(records[0]["png"])))).float()[None, None] / 127.5 - 1
    left, _ = pair_halves(image)  # the first digit, at half the side
    small = torch.nn.functional.interpolate(digits.images[:1], size=(16, 16), mode="bilinear", antialias=True)
    assert torch.corrcoef(torch.stack([left.flatten(), small.flatten()]))[0, 1] > 0.95
