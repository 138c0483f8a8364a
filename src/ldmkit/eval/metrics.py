"""Metrics from features, with float64 statistics."""

from __future__ import annotations

import numpy as np
import torch


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {list(f.shape)}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _checked_statistics(*statistics):
    """(mu, sigma, ...) as float64, all of one dimension D (mu [D], sigma [D, D]) and finite."""
    out = [
        np.atleast_2d(x).astype(np.float64) if i % 2 else np.atleast_1d(x).astype(np.float64)
        for i, x in enumerate(statistics)
    ]
    d = len(out[0])
    if any(x.shape != ((d, d) if i % 2 else (d,)) for i, x in enumerate(out)):
        raise ValueError(f"statistics of different dimension: {[x.shape for x in out]}")
    if not all(np.isfinite(x).all() for x in out):
        raise ValueError("statistics hold NaN or inf (features of broken images?)")
    return out


def _frechet(mu1, trace1, mu2, trace2, trace_sqrt) -> float:
    diff = mu1 - mu2
    return float(diff.dot(diff) + trace1 + trace2 - 2 * trace_sqrt)


def _trace_sqrt_of_psd(matrix: np.ndarray) -> float:
    """Tr(M^(1/2)) of a symmetric positive semi-definite M, round-off below 0 clipped."""
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((matrix + matrix.T) / 2), 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)), in float64.

    The trace of the matrix square root is computed as sum(sqrt(eig(A S2 A))) with A = S1^(1/2): A S2 A is
    symmetric positive semi-definite and has the eigenvalues of S1 S2, so two symmetric eigendecompositions
    replace a general sqrtm: no complex round-off to discard, no failure on singular covariances (fewer samples
    than dimensions), negative round-off eigenvalues clipped at 0, and several times faster at 2048 dimensions."""
    mu1, sigma1, mu2, sigma2 = _checked_statistics(mu1, sigma1, mu2, sigma2)
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return _frechet(mu1, np.trace(sigma1), mu2, np.trace(sigma2), _trace_sqrt_of_psd(root1 @ sigma2 @ root1))


def frechet_distance_to(features, mu, sigma) -> float:
    """The Frechet distance between a feature set [N, D] and statistics (mu, sigma): the value of
    frechet_distance(*feature_statistics(features), mu, sigma). With N <= D the set's covariance is S1 = B^T B
    (B: the centred features / sqrt(N - 1)), and S1 S2 has the nonzero eigenvalues of B S2 B^T: one N x N
    eigenproblem replaces two D x D ones. B's rows sum to zero, so B S2 B^T always has a zero eigenvalue whose
    round-off the square root would magnify (sqrt(1e-13) = 3e-7); a Householder reflection that maps the ones
    vector to the last axis leaves B's N - 1 informative rows, and the eigenproblem is (N - 1) x (N - 1)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {list(f.shape)}")
    if f.shape[0] > f.shape[1]:
        return frechet_distance(*feature_statistics(f), mu, sigma)
    if not np.isfinite(f).all():
        raise ValueError("features hold NaN or inf (broken images?)")
    mu1 = f.mean(axis=0)
    mu2, sigma2 = _checked_statistics(mu, sigma)
    if mu2.shape != mu1.shape:
        raise ValueError(f"statistics of different dimension: features {f.shape[1]} vs statistics {mu2.shape[0]}")
    n = len(f)
    root = (f - mu1) / np.sqrt(n - 1)  # S1 = root^T root
    v = np.full(n, 1 / np.sqrt(n))
    v[-1] -= 1  # H = I - 2 v v^T / v^T v maps ones / sqrt(N) to the last axis; H root's last row is 0
    root = (root - np.outer(2 * v / v.dot(v), v @ root))[:-1]
    return _frechet(mu1, (root * root).sum(), mu2, np.trace(sigma2), _trace_sqrt_of_psd(root @ sigma2 @ root.T))


def frechet_distance_of(features_a, features_b) -> float:
    """The Frechet distance between two feature sets; the smaller set takes the N x N path of frechet_distance_to."""
    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    small, large = (a, b) if len(a) <= len(b) else (b, a)
    return frechet_distance_to(small, *feature_statistics(large))


def kernel_inception_distance(
    features_gen, features_ref, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> dict:
    """KID (unbiased MMD^2, cubic polynomial kernel) by torch-fidelity, over random subsets; the subset size is
    capped by the smaller set (torch-fidelity's default, 1000, needs that many samples)."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    a, b = (
        torch.as_tensor(np.asarray(features_gen, dtype=np.float64)),
        torch.as_tensor(np.asarray(features_ref, dtype=np.float64)),
    )
    size = min(subset_size, len(a), len(b))
    out = kid_features_to_metric(
        a,
        b,
        kid_subsets=subsets,
        kid_subset_size=size,
        rng_seed=seed,
        verbose=False,
        kid_kernel="poly",
        kid_kernel_poly_degree=3,
        kid_kernel_poly_gamma=None,
        kid_kernel_poly_coef0=1,
    )
    return {
        "kid": out["kernel_inception_distance_mean"],
        "kid_std": out["kernel_inception_distance_std"],
        "kid_subset_size": size,
    }


def precision_recall(features_gen, features_ref, k: int = 3) -> dict:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds, by torch-fidelity."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    a, b = (
        torch.as_tensor(np.asarray(features_gen, dtype=np.float32)),
        torch.as_tensor(np.asarray(features_ref, dtype=np.float32)),
    )
    out = prc_features_to_metric(a, b, prc_neighborhood=k, prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    return {"precision": float(out["precision"]), "recall": float(out["recall"])}


def density_coverage(features_gen, features_ref, k: int = 5) -> dict:
    """Density and coverage (Naeem et al. 2020): with r_i the distance of real sample i to its k-th nearest
    real neighbour, density = mean over generated j of #{i: d(j, i) < r_i} / k, and coverage = the share of
    real samples with at least one generated sample inside their radius."""
    real = torch.as_tensor(np.asarray(features_ref, dtype=np.float64))
    fake = torch.as_tensor(np.asarray(features_gen, dtype=np.float64))
    real_d = torch.cdist(real, real)
    radius = real_d.kthvalue(k + 1, dim=1).values  # k+1: the nearest is the point itself
    inside = torch.cdist(fake, real) < radius[None, :]  # [n_fake, n_real]
    return {"density": float(inside.sum() / (k * len(fake))), "coverage": float(inside.any(dim=0).float().mean())}
