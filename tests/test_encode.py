"""`ldmkit encode` and the latent cache: bad images counted, round trip against on-the-fly encoding, resume,
two processes without overlap, text embeddings from captioned shards, buckets, and training from the cache."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, state_of
from PIL import Image

from ldmkit.config import ConfigError, dump_config, load_config
from ldmkit.data.cache import LatentCache, memmap_safetensors
from ldmkit.data.datasets import DataError, pil_to_tensor
from ldmkit.data.loader import BucketBatches
from ldmkit.data.transforms import crop_with_metadata
from ldmkit.training.encode import encode_dataset
from ldmkit.training.loop import training_loop


def quiet(*args, **kwargs):
    pass


def jpeg_bytes(image):
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_bad_folder(root):
    """Eight good RGB images in two classes and one of every bad case."""
    rng = np.random.default_rng(1)
    good = root / "n01440764"
    other = root / "n01443537"
    good.mkdir(parents=True), other.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(good / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(other / f"{i}.png")
    (good / "x_corrupt.jpg").write_bytes(b"GIF89a? this is no image at all")
    whole = jpeg_bytes(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    (good / "x_truncated.jpg").write_bytes(whole[: len(whole) // 2])
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(other / "x_gray.png")
    Image.new("CMYK", (40, 40), (10, 200, 30, 0)).save(other / "x_cmyk.jpg")
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent: becomes white
    rgba.save(other / "x_rgba.png")
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(other / "x_small.png")
    return root


def folder_config(data, cache, vae=None, *extra):
    ae = (
        [
            "autoencoder.name=kl",
            f"autoencoder.path={vae}",
            "autoencoder.layout=sd",
            "model.in_channels=4",
            "model.input_size=16",
        ]
        if vae
        else []
    )
    return load_config(
        overrides=TINY
        + ae
        + [
            "data.name=image_folder",
            f"data.path={data}",
            "data.channels=3",
            "data.resolution=32",
            "data.min_side=16",
            f"data.cache={cache}",
            "data.cache_dtype=float32",
            "data.encode_chunk=5",
            "model.num_classes=2",
            *extra,
        ]
    )


def test_bad_images_are_counted_and_cache_equals_on_the_fly_encoding(tmp_path, tiny_vae):
    from ldmkit.autoencoders import build_autoencoder

    data = make_bad_folder(tmp_path / "data")
    cfg = folder_config(data, tmp_path / "cache", tiny_vae)
    manifest_path = encode_dataset(cfg, batch_size=3, log=quiet)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["count"] == 11  # 8 good + gray, CMYK, RGBA converted
    assert manifest["skipped"] == {"corrupt": 1, "truncated": 1, "too small": 1}
    assert sorted(s["key"] for s in manifest["skipped_files"]) == [
        "n01440764/x_corrupt.jpg",
        "n01440764/x_truncated.jpg",
        "n01443537/x_small.png",
    ]
    assert manifest["converted"] == {"L": 1, "CMYK": 1, "RGBA": 1}
    assert manifest["latent_shape"] == [4, 16, 16]
    assert manifest["autoencoder"]["layout"] == "sd"
    assert len(manifest["parts"]) == 3  # 15 files in units of 5

    cache = LatentCache(tmp_path / "cache")
    assert len(cache) == 11
    assert cache.labels.tolist() == [0] * 4 + [1] * 7
    keys = [
        k for p in manifest["parts"] for k in json.loads(memmap_safetensors(tmp_path / "cache" / p["file"])[2]["keys"])
    ]
    ae = build_autoencoder(cfg.autoencoder, 3)
    assert [Path(k).name for k in keys[8:]] == ["x_cmyk.jpg", "x_gray.png", "x_rgba.png"]
    for i in (0, 5, 9, 10):  # plain images, the grayscale and the RGBA one
        image = Image.open(data / keys[i]).convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255,) * 4), image).convert("RGB")
        cropped, meta = crop_with_metadata(image, 32, "center")
        x = pil_to_tensor(cropped)[None]
        mean, std = ae.moments(x)
        mean_flip, _ = ae.moments(x.flip(-1))
        sample = cache.__getitems__([(i, 0)])
        assert torch.allclose(sample["latent_mean"][0], mean[0], atol=1e-5)
        assert torch.allclose(sample["latent_std"][0], std[0], atol=1e-5)
        part = int(np.searchsorted(cache.offsets, i, side="right")) - 1
        stored = memmap_safetensors(tmp_path / "cache" / manifest["parts"][part]["file"])[0]
        row = i - int(cache.offsets[part])
        assert np.allclose(stored["latent_mean"][row, 1], mean_flip[0].numpy(), atol=1e-5)  # the mirror image's moments
        control = {k: v[0].tolist() for k, v in sample["control"].items()}
        assert control["original_size"] == list(meta.original_size)
        assert control["crop_size"] == list(meta.crop_size)
        assert control["flip"] == [0.0]
    # The fully transparent RGBA image became white (not black) before encoding.
    from ldmkit.data.transforms import load_image

    assert np.asarray(load_image(data / keys[10])[0]).min() == 255


def test_encode_resumes_where_it_stopped(tmp_path):
    data = make_bad_folder(tmp_path / "data")
    cfg = folder_config(data, tmp_path / "cache", None, "data.channels=3", "model.in_channels=3")
    assert encode_dataset(cfg, log=quiet, stop_after_units=1) is None  # "interrupted" after one unit
    first = tmp_path / "cache" / "part-000000-b0.safetensors"
    before = first.stat().st_mtime_ns
    assert not (tmp_path / "cache" / "manifest.json").exists()
    messages = []
    assert encode_dataset(cfg, log=messages.append) is not None
    assert "1 already done" in messages[0]
    assert first.stat().st_mtime_ns == before  # not redone
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    keys = [
        k for p in manifest["parts"] for k in json.loads(memmap_safetensors(tmp_path / "cache" / p["file"])[2]["keys"])
    ]
    assert len(keys) == len(set(keys)) == manifest["count"] == 11


@pytest.mark.slow
def test_two_processes_encode_disjoint_units(tmp_path):
    data = make_bad_folder(tmp_path / "data")
    cfg = folder_config(data, tmp_path / "cache", None, "model.in_channels=3", "data.encode_chunk=3")
    dump_config(cfg, tmp_path / "cfg.yaml")
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "ldmkit.cli", "encode", str(tmp_path / "cfg.yaml")],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    units = [json.loads(f.read_text()) for f in sorted((tmp_path / "cache").glob("part-*.json"))]
    assert len(units) == 5  # 15 files in units of 3; rank 0 took 0, 2, 4 and rank 1 took 1, 3
    keys = [
        k for p in manifest["parts"] for k in json.loads(memmap_safetensors(tmp_path / "cache" / p["file"])[2]["keys"])
    ]
    assert len(keys) == len(set(keys)) == 11
    assert "unit 000001" in outputs[1]
    assert "unit 000001" not in outputs[0]
    assert "unit 000002" in outputs[0]


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory):
    from ldmkit.data.shards import write_mnist_caption_shards

    folder = tmp_path_factory.mktemp("digit-shards")
    write_mnist_caption_shards(folder, load_config().data, "held_out", shard_size=100)
    return folder


def text_overrides(shards, cache):
    return TINY + [
        "data.name=shards",
        f"data.path={shards}/mnist-{{00000..00004}}.tar",
        "data.label_field=label",
        "data.crop=none",
        f"data.cache={cache}",
        "data.cache_dtype=float32",
        "text.encoder=minilm",
        "text.max_length=16",
        "model.conditioning=pooled_text",
        "sample.class_prompts=[a handwritten digit zero, a handwritten digit one]",
    ]


@pytest.mark.slow
def test_captioned_shards_to_text_cache_to_training(tmp_path, digit_shards):
    from ldmkit.conditioning.text_encoders import TextEncoder
    from ldmkit.data.shards import digit_caption

    cfg = load_config(overrides=text_overrides(digit_shards, tmp_path / "cache"))
    encode_dataset(cfg, batch_size=64, log=quiet)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["count"] == 500
    assert len(manifest["parts"]) == 5
    assert manifest["text_encoder"]["kind"] == "minilm"
    assert manifest["text_encoder"]["pooled_dim"] == 384
    cache = LatentCache(tmp_path / "cache")
    batch = cache.__getitems__([(0, 0), (250, 0), (499, 0)])
    assert batch["text_tokens"].shape == (3, 16, 384)
    assert batch["text_mask"].dtype == torch.bool
    captions = [digit_caption(int(y)) for y in batch["label"]]
    text = TextEncoder("minilm", max_length=16)(captions)
    assert torch.allclose(batch["text_pooled"], text.pooled, atol=1e-5)
    assert torch.equal(batch["text_mask"], text.mask)
    assert torch.allclose(batch["text_tokens"], text.tokens, atol=1e-4)

    run = training_loop(
        load_config(overrides=text_overrides(digit_shards, tmp_path / "cache") + ["data.from_cache=true"]),
        tmp_path / "run",
        quiet=True,
    )
    assert state_of(run)["images_seen"] == 128
    with pytest.raises(ConfigError, match="model.pooled_dim"):
        training_loop(
            load_config(
                overrides=text_overrides(digit_shards, tmp_path / "cache")
                + ["data.from_cache=true", "model.pooled_dim=32"]
            ),
            tmp_path / "run2",
            quiet=True,
        )


@pytest.mark.slow
def test_training_from_raw_shards_with_online_text_encoder_resumes_exactly(tmp_path, digit_shards):
    overrides = text_overrides(digit_shards, tmp_path / "unused") + ["data.shuffle_buffer=50"]
    straight = training_loop(load_config(overrides=overrides), tmp_path / "straight", quiet=True)
    split = training_loop(load_config(overrides=overrides), tmp_path / "split", quiet=True, stop_after_images=64)
    assert state_of(split)["images_seen"] == 64
    training_loop(load_config(overrides=overrides), tmp_path / "split", quiet=True)
    a, b = state_of(straight)["model"], state_of(tmp_path / "split")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_training_from_cache_equals_training_from_raw_digits(tmp_path):
    """Identity autoencoder, float32 cache: the cache holds the images themselves, so with the same order,
    flips and metadata the two runs must give the same weights bit for bit."""
    base = TINY + [
        "data.hflip=true",
        f"data.cache={tmp_path / 'cache'}",
        "data.cache_dtype=float32",
        "data.encode_chunk=1000",
    ]
    encode_dataset(load_config(overrides=base), log=quiet)
    raw = training_loop(load_config(overrides=base), tmp_path / "raw", quiet=True)
    cached = training_loop(load_config(overrides=base + ["data.from_cache=true"]), tmp_path / "cached", quiet=True)
    a, b = state_of(raw)["model"], state_of(cached)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_buckets_assign_by_aspect_and_batches_stay_in_one_bucket(tmp_path):
    from ldmkit.data.transforms import nearest_bucket

    buckets = [[32, 32], [32, 48], [48, 32]]
    assert [
        nearest_bucket(h, w, buckets)
        for h, w in ((100, 100), (100, 160), (160, 100), (100, 140), (140, 100), (100, 120))
    ] == [0, 1, 2, 1, 2, 0]
    root = tmp_path / "data" / "n0"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(60, 60)] * 8 + [(60, 96)] * 8 + [(96, 60)] * 4):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    overrides = TINY + [
        "data.name=image_folder",
        f"data.path={tmp_path / 'data'}",
        "data.channels=3",
        "model.in_channels=3",
        "model.num_classes=1",
        f"data.cache={tmp_path / 'cache'}",
        "data.crop=random",
        "train.global_batch=4",
        "train.total_images=32",
        "data.buckets=[[32, 32], [32, 48], [48, 32]]",
        "data.from_cache=true",
    ]
    cfg = load_config(overrides=overrides)
    encode_dataset(cfg, log=quiet)
    cache = LatentCache(tmp_path / "cache")
    assert np.bincount(cache.bucket_of).tolist() == [8, 8, 4]
    assert cache.__getitems__([(8, 0)])["latent_mean"].shape == (1, 3, 32, 48)
    assert cache.__getitems__([(8, 0)])["control"]["target_size"].tolist() == [[32.0, 48.0]]
    with pytest.raises(DataError, match="mixes aspect-ratio buckets"):
        cache.__getitems__([(0, 0), (8, 0)])
    sampler = BucketBatches(
        cache.bucket_of, seed=0, start=0, end=40, global_batch=4, micro=2, rounds=2, world=1, rank=0
    )
    batches = list(sampler)
    assert sampler.batches_per_epoch == 5
    assert len(batches) == 20
    for k in range(0, 20, 2):  # the two micro-batches of a step: one bucket
        assert len({int(cache.bucket_of[i]) for i, _ in batches[k] + batches[k + 1]}) == 1
    epoch0 = [i for b in batches[:10] for i, _ in b]
    assert sorted(epoch0) == list(range(20))  # each sample once per epoch (no remainders here)
    resumed = list(BucketBatches(cache.bucket_of, 0, 12, 40, 4, 2, 2, 1, 0))
    assert resumed == batches[6:]  # resume at 12 images continues with the fourth step
    run = training_loop(cfg, tmp_path / "run", quiet=True)  # DiT on 32x32, 32x48 and 48x32 grids
    assert state_of(run)["images_seen"] == 32


def test_cache_errors_are_one_line(tmp_path):
    with pytest.raises(DataError, match="run 'ldmkit encode CONFIG' first"):
        LatentCache(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="data.buckets"):
        load_config(overrides=["data.buckets=[[32, 32]]"])
    with pytest.raises(ConfigError, match="data.cache"):
        load_config(overrides=["data.from_cache=true"])
    with pytest.raises(ConfigError, match="text.encoder"):
        load_config(overrides=["model.conditioning=pooled_text"])


@pytest.mark.slow
def test_cache_pickles_without_copying_its_arrays(tmp_path):
    import pickle

    base = TINY + [f"data.cache={tmp_path / 'cache'}", "data.encode_chunk=2000"]
    encode_dataset(load_config(overrides=base), log=quiet)
    cache = LatentCache(tmp_path / "cache", hflip=True)
    blob = pickle.dumps(cache)
    assert len(blob) < 200_000  # 4,500 digits of 32x32 would be megabytes
    clone = pickle.loads(blob)
    a, b = cache.__getitems__([(3, 7), (4000, 1)]), clone.__getitems__([(3, 7), (4000, 1)])
    assert torch.equal(a["latent_mean"], b["latent_mean"])
    assert torch.equal(a["control"]["flip"], b["control"]["flip"])
