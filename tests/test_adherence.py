"""Control adherence measures on images whose controls were applied for real: a small original comes out less
sharp, and a crop moves and magnifies the ink box as the requested crop says; a model that ignores the control
scores as ignoring it."""

import torch
import torch.nn.functional as F

from ldmkit.eval.adherence import crop_adherence, ink_box, mirror_agreement, sharpness, size_adherence


def digits(n: int = 6, side: int = 28) -> torch.Tensor:
    """Stroke images in [-1, 1]: a bright bar and a dot at sample-dependent places, on a dark background."""
    g = torch.Generator().manual_seed(0)
    x = -torch.ones(n, 1, side, side)
    for i in range(n):
        top, left = (int(v) for v in torch.randint(6, 10, (2,), generator=g))
        x[i, :, top : top + 12, left + 5 : left + 8] = 1.0
        x[i, :, top + 2 : top + 5, left + 9 : left + 12] = 1.0
    return x


def stored_at(images: torch.Tensor, size: int) -> torch.Tensor:
    """The augmentation's original_size: stored at `size` pixels, shown at the full side again."""
    side = images.shape[-1]
    small = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return F.interpolate(small, size=(side, side), mode="bilinear", align_corners=False)


def cropped(images: torch.Tensor, top: int, left: int, size: int) -> torch.Tensor:
    side = images.shape[-1]
    window = images[..., top : top + size, left : left + size]
    return F.interpolate(window, size=(side, side), mode="bilinear", align_corners=False)


def test_smaller_originals_are_less_sharp_and_the_sweep_correlates():
    x = digits()
    sweep = [stored_at(x, s) for s in (12, 20, 28)]
    means = [float(sharpness(s).mean()) for s in sweep]
    assert means[0] < means[1] < means[2]
    followed = size_adherence([(12, 12), (20, 20), (28, 28)], sweep)
    ignored = size_adherence([(12, 12), (20, 20), (28, 28)], [x, x, x])
    assert followed["size_sharpness_correlation"] > 0.5
    assert abs(ignored["size_sharpness_correlation"]) < 0.2


def test_crop_adherence_tells_a_followed_crop_from_an_ignored_one():
    x = digits()
    crops = [((0, 0), (28, 28)), ((0, 0), (22, 22)), ((4, 4), (18, 18))]
    sweep = [x, cropped(x, 0, 0, 22), cropped(x, 4, 4, 18)]
    followed = crop_adherence(crops, (28, 28), sweep)
    assert followed["crop_iou"][0] == 1.0
    assert min(followed["crop_iou"][1:]) > 0.8
    assert max(followed["crop_iou_if_ignored"][1:]) < 0.7
    ignored = crop_adherence(crops, (28, 28), [x, x, x])
    assert ignored["crop_iou_if_ignored"] == [1.0, 1.0, 1.0]
    assert max(ignored["crop_iou"][1:]) < 0.7


def test_ink_box_of_an_empty_image_is_missing():
    boxes = ink_box(torch.cat([digits(1), -torch.ones(1, 1, 28, 28)]))
    assert not boxes[0].isnan().any() and boxes[1].isnan().all()


def test_the_mirror_test_tells_a_followed_flip_from_an_ignored_one():
    x = digits()

    def nearest(images):  # a classifier of the upright strokes: the label of the nearest one
        return torch.cdist(images.flatten(1), x.flatten(1)).argmin(1)

    labels = nearest(x)  # what the classifier says of the upright samples is what the sweep asks

    followed = mirror_agreement(nearest, [x, x.flip(-1)], labels)
    assert followed == [0.0, 1.0]  # the strokes are not symmetric: only the flip-1 samples mirror back upright
    ignored = mirror_agreement(nearest, [x, x], labels)
    assert ignored[0] == ignored[1] == 0.0
