"""Crop strategies record the metadata of what they did."""

import numpy as np
import pytest
from PIL import Image

from ldmkit.data.transforms import CROP_STRATEGIES, crop_with_metadata


def gradient_image(h=300, w=200):
    """Pixel value encodes position, so a crop's content tells where it came from."""
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([y * 255 // h, x * 255 // w, np.zeros_like(x)], -1).astype(np.uint8))


def test_center_crop_metadata():
    out, meta = crop_with_metadata(gradient_image(300, 200), 64, "center")
    assert out.size == (64, 64)
    assert meta.original_size == (300, 200)
    assert meta.crop_size == (200.0, 200.0)
    assert meta.crop_top_left == (50.0, 0.0)
    assert meta.target_size == (64, 64)
    assert meta.aspect_ratio == pytest.approx(2 / 3)
    assert meta.flip == 0
    # the centre row of the output comes from the centre row of the source (red channel = row position)
    assert abs(np.asarray(out)[32, 32, 0] - 255 * 150 // 300) <= 3


def test_random_crop_stays_inside_and_is_reproducible():
    seen = set()
    for seed in range(20):
        out, meta = crop_with_metadata(gradient_image(300, 200), 32, "random", np.random.default_rng(seed))
        top, left = meta.crop_top_left
        assert 0 <= top <= 100
        assert left == 0
        assert meta.crop_size == (200.0, 200.0)
        seen.add(top)
        again, meta2 = crop_with_metadata(gradient_image(300, 200), 32, "random", np.random.default_rng(seed))
        assert meta2 == meta
        assert np.array_equal(np.asarray(again), np.asarray(out))
        # content matches the recorded position: the top row's red value is the crop's top row
        assert abs(int(np.asarray(out)[0, 16, 0]) - 255 * top / 300) <= 6
    assert len(seen) > 5


def test_random_resized_crop_respects_scale_and_ratio():
    for seed in range(30):
        _, meta = crop_with_metadata(
            gradient_image(300, 200), 32, "random_resized", np.random.default_rng(seed), scale=(0.25, 0.5)
        )
        h, w = meta.crop_size
        top, left = meta.crop_top_left
        assert 0 <= top
        assert top + h <= 300
        assert 0 <= left
        assert left + w <= 200
        assert 0.24 <= h * w / (300 * 200) <= 0.51
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02


def test_none_keeps_the_whole_image():
    out, meta = crop_with_metadata(gradient_image(300, 200), 16, "none")
    assert meta.crop_top_left == (0.0, 0.0)
    assert meta.crop_size == (300.0, 200.0)
    assert out.size == (16, 16)


def test_flip_is_recorded_and_mirrors():
    flips = []
    for seed in range(40):
        out, meta = crop_with_metadata(
            gradient_image(200, 200), 32, "center", np.random.default_rng(seed), flip_prob=0.5
        )
        plain, _ = crop_with_metadata(gradient_image(200, 200), 32, "center")
        expected = np.asarray(plain)[:, ::-1] if meta.flip else np.asarray(plain)
        assert np.array_equal(np.asarray(out), expected)
        flips.append(meta.flip)
    assert 10 < sum(flips) < 30


def test_control_values_and_errors():
    _, meta = crop_with_metadata(gradient_image(300, 200), 32, "center")
    control = meta.as_control()
    assert control["original_size"] == [300.0, 200.0]
    assert control["flip"] == [0.0]
    assert set(control) == {"original_size", "crop_top_left", "crop_size", "target_size", "aspect_ratio", "flip"}
    with pytest.raises(ValueError, match="unknown crop strategy"):
        crop_with_metadata(gradient_image(), 32, "zoom")
    with pytest.raises(ValueError, match="needs a random generator"):
        crop_with_metadata(gradient_image(), 32, "random")
    with pytest.raises(ValueError, match="needs a random generator"):  # flips are random for every strategy
        crop_with_metadata(gradient_image(), 32, "center", flip_prob=0.5)
    assert set(CROP_STRATEGIES) == {"center", "random", "random_resized", "none"}


def test_bucket_targets_keep_the_bucket_aspect_ratio():
    image = Image.new("RGB", (200, 100))
    out, meta = crop_with_metadata(image, (32, 48), "center")
    assert out.size == (48, 32)
    assert meta.target_size == (32, 48)
    assert meta.crop_size == (100.0, 150.0)
    assert meta.crop_top_left == (0.0, 25.0)  # largest 2:3 region, centred
    rng = np.random.default_rng(0)
    lefts = {crop_with_metadata(image, (32, 48), "random", rng)[1].crop_top_left[1] for _ in range(20)}
    assert len(lefts) > 1
    assert all(0 <= x <= 50 for x in lefts)


def test_load_image_converts_and_rejects():
    import io

    from ldmkit.data.transforms import BadImage, load_image

    def encoded(image, fmt):
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        return buf.getvalue()

    cmyk, mode = load_image(encoded(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG"))
    assert cmyk.mode == "RGB"
    assert mode == "CMYK"
    assert np.asarray(cmyk)[0, 0, 0] > 200  # red stays red
    rgba, mode = load_image(encoded(Image.new("RGBA", (20, 20), (0, 0, 0, 0)), "PNG"))
    assert mode == "RGBA"
    assert np.asarray(rgba).min() == 255  # transparent -> white
    gray, mode = load_image(encoded(Image.new("RGB", (20, 20)), "PNG"), channels=1)
    assert gray.mode == "L"
    assert mode == "RGB"
    whole = encoded(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    for data, reason in ((b"nonsense", "corrupt"), (whole[: len(whole) // 2], "truncated")):
        with pytest.raises(BadImage, match=reason):
            load_image(data)
    with pytest.raises(BadImage, match="too small"):
        load_image(encoded(Image.new("RGB", (8, 12)), "PNG"), min_size=10)
