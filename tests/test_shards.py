"""WebDataset shards of the captioned digits: written, read back, split across ranks without overlap."""
import io
import tarfile

import numpy as np
import pytest

from ldmkit.config import load_config
from ldmkit.data.datasets import build_dataset
from ldmkit.data.shards import digit_caption, read_shards, shards_for_rank, write_mnist_caption_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    cfg = load_config()
    return write_mnist_caption_shards(tmp_path_factory.mktemp("shards"), cfg.data, "held_out", shard_size=120), cfg


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
        assert caption == digit_caption(label) and meta["label"] == label and meta["key"] == f"held_out{i:07d}"
        expected = ((ds.images[i, 0].numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        assert np.array_equal(np.asarray(image), expected)  # PNG is lossless


def test_ranks_read_disjoint_shards_covering_everything(shards):
    paths, _ = shards
    keys = [set(m["key"] for _, _, m in read_shards(shards_for_rank(paths, r, 2))) for r in range(2)]
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == 500
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
    assert digit_caption(7) == "a handwritten digit seven" and digit_caption(0) == "a handwritten digit zero"
