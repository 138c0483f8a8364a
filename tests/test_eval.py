import numpy as np
import pytest
import torch

from ldmkit.eval.metrics import feature_statistics, frechet_distance, frechet_distance_of


def test_frechet_distance_closed_form_for_gaussians():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(6, 6))
    s1 = A @ A.T + np.eye(6)
    s2 = np.diag(rng.uniform(0.5, 2, 6))
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    # For commuting (here: one diagonal, checked numerically) matrices the square root has a closed form;
    # in general use the eigen-decomposition route: Tr((S1 S2)^1/2) = sum sqrt(eig(S1 S2)).
    eig = np.linalg.eigvals(s1 @ s2)
    expected = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(eig.real)))
    assert abs(frechet_distance(mu1, s1, mu2, s2) - expected) < 1e-8


def test_fd_of_a_set_with_itself_is_zero_and_grows_with_shift():
    f = np.random.default_rng(1).normal(size=(500, 8))
    assert abs(frechet_distance_of(f, f)) < 1e-8
    assert frechet_distance_of(f, f + 1.0) == pytest.approx(8.0, rel=1e-6)


def test_statistics_need_two_samples():
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(np.zeros((1, 4)))


def test_effnet_features_are_real_and_deterministic():
    from ldmkit.eval.features import EffNetLite0Features

    net = EffNetLite0Features()
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    f = net(x)
    assert f.shape == (3, 1280)
    assert torch.isfinite(f).all()
    assert torch.allclose(net(x), f)
    # pretrained ImageNet weights, not random: the classifier head is confident on a structured image
    head = net.net._fc.weight
    assert head.shape == (1000, 1280)
    assert head.std() > 0.01


@pytest.mark.slow
def test_digit_classifier_learns_real_digits():
    from ldmkit.data.datasets import mnist_digits
    from ldmkit.eval.digits import accuracy, train_classifier

    images, labels = mnist_digits(32)
    perm = torch.randperm(5000, generator=torch.Generator().manual_seed(0))  # the digits are sorted by class
    train, test = perm[:1500], perm[4000:]
    model = train_classifier(images[train], labels[train], epochs=2)
    assert accuracy(model, images[test], labels[test]) > 0.85
    # digit pairs (eval.digit_layout pairs): each half classified, label 10 x left + right
    from ldmkit.config import load_config
    from ldmkit.data.shards import pair_image
    from ldmkit.eval.evaluate import digit_classes, eval_prompts, predict_digits

    cfg = load_config(overrides=["eval.digit_layout=pairs", "data.resolution=32"])
    small, _ = mnist_digits(16)  # each half of a 32-pixel pair is a 16-pixel digit: the classifier of pairs
    model = train_classifier(small[train], labels[train], epochs=2)
    left, right = test[:200], test[200:400]
    pairs = torch.stack([pair_image(images[a], images[b]) for a, b in zip(left, right)])
    truth = 10 * labels[left] + labels[right]
    agreement = (predict_digits(cfg, model, pairs) == truth).float().mean()
    assert agreement > 0.7  # both digits right (each about 0.9)
    assert (predict_digits(cfg, model, pairs.flip(-1)) == truth).float().mean() < 0.2  # mirrored: the sides swap
    assert digit_classes(cfg) == 100
    text = load_config(overrides=["eval.digit_layout=pairs", "model.conditioning=text", "text.encoder=minilm",
                                  "data.name=shards", "data.path=x.tar", "eval.digits=true"])  # fmt: skip
    assert eval_prompts(text, torch.tensor([38, 38]))[1] == "a three to the left of an eight"


def test_frechet_distance_matches_scipy_sqrtm_and_survives_singular_covariances():
    from scipy import linalg

    from ldmkit.eval.metrics import feature_statistics, frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 20)), rng.normal(size=(500, 20)) @ rng.normal(size=(20, 20)) * 0.3 + 1
    (m1, s1), (m2, s2) = feature_statistics(a), feature_statistics(b)
    reference = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(reference, rel=1e-9)
    few = feature_statistics(rng.normal(size=(5, 64)))  # rank-deficient covariances (5 samples, 64 dimensions)
    assert np.isfinite(frechet_distance(*few, *feature_statistics(rng.normal(size=(6, 64)))))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(m1, s1 * np.nan, m2, s2)


def test_fewer_samples_than_dimensions_take_the_small_eigenproblem_with_the_same_value():
    """frechet_distance_to and frechet_distance_of solve an N x N problem when N <= D. Independent reference:
    with S = A^T A for the centred, scaled features A of each set, Tr((S1 S2)^(1/2)) is the sum of the singular
    values of A1 A2^T. The D x D route agrees to 1e-7 only: it clips the round-off eigenvalues of the singular
    covariance's null space, which the small problem never forms."""
    from ldmkit.eval.metrics import frechet_distance_to

    def by_singular_values(a, b):
        (m1, s1), (m2, s2) = feature_statistics(a), feature_statistics(b)
        a1, a2 = (a - m1) / np.sqrt(len(a) - 1), (b - m2) / np.sqrt(len(b) - 1)
        nuclear = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
        return ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * nuclear

    rng = np.random.default_rng(3)
    mixing = rng.normal(size=(96, 96)) * 0.2
    few, many = rng.normal(size=(40, 96)) @ mixing + 0.5, rng.normal(size=(300, 96))
    exact = by_singular_values(few, many)
    assert frechet_distance_to(few, *feature_statistics(many)) == pytest.approx(exact, rel=1e-12)
    assert frechet_distance_of(few, many) == pytest.approx(exact, rel=1e-12)
    assert frechet_distance_of(many, few) == pytest.approx(exact, rel=1e-12)
    assert frechet_distance(*feature_statistics(few), *feature_statistics(many)) == pytest.approx(exact, rel=1e-7)
    both_small = by_singular_values(few[:7] * 2, few)  # both sets below D
    assert frechet_distance_of(few[:7] * 2, few) == pytest.approx(both_small, rel=1e-12)
    assert abs(frechet_distance_of(few, few)) < 1e-9
    with pytest.raises(ValueError, match="different dimension"):
        frechet_distance_to(few, *feature_statistics(many[:, :50]))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance_to(np.where(few > 2, np.nan, few), *feature_statistics(many))
