"""Metrics from features, with float64 statistics."""

from __future__ import annotations

import numpy as np
import torch


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {list(f.shape)}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)), in float64.

    The trace of the matrix square root is computed as sum(sqrt(eig(A S2 A))) with A = S1^(1/2): A S2 A is
    symmetric positive semi-definite and has the eigenvalues of S1 S2, so two symmetric eigendecompositions
    replace a general sqrtm: no complex round-off to discard, no failure on singular covariances (fewer samples
    than dimensions), negative round-off eigenvalues clipped at 0, and several times faster at 2048 dimensions."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimension: {mu1.shape} vs {mu2.shape}")
    if not (
        np.isfinite(sigma1).all() and np.isfinite(sigma2).all() and np.isfinite(mu1).all() and np.isfinite(mu2).all()
    ):
        raise ValueError("statistics hold NaN or inf (features of broken images?)")
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def frechet_distance_of(features_a, features_b) -> float:
    return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


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
