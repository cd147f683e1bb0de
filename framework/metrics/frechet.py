"""Fréchet distance between two Gaussians, in float64, as FID (Heusel et al. 2017) and FVD (Unterthiner et al. 2018).

    d² = ‖μ₁ − μ₂‖² + tr(Σ₁) + tr(Σ₂) − 2 tr((Σ₁ Σ₂)^{1/2})

The only hard part is the trace of the matrix square root of the (non-symmetric) product Σ₁Σ₂. We use

    tr((Σ₁ Σ₂)^{1/2}) = ‖√Σ₁ √Σ₂‖_*   (the nuclear norm: the sum of singular values)

because Σ₁Σ₂ is similar to √Σ₁ Σ₂ √Σ₁ = (√Σ₁√Σ₂)(√Σ₁√Σ₂)ᵀ, whose eigenvalues are the squared singular values of
√Σ₁√Σ₂. Both square roots are symmetric PSD roots from an eigendecomposition: no complex arithmetic, no iteration,
and exact for the rank-deficient covariances of a set with fewer samples than feature dimensions (e.g. 128 clips,
400-d features), where ``scipy.linalg.sqrtm`` of the product needs its complex Schur fallback. On the statistics of
the published FVD check this gives the same number as a numpy re-implementation of TF-GAN's ``trace_sqrt_product``
(SVD square roots with a 1e-10 cut-off; behind the
published FVD numbers) to 3e-12. Taking the eigenvalues of √Σ₁ Σ₂ √Σ₁, clamping them at 0 and rooting them is
the same quantity in exact arithmetic but loses half the digits of the small ones: for 13 samples of 400-d
features the distance of a set to itself came out as −0.004 that way, −1e-10 here.
Eigenvalues of Σ that round-off pushes below zero are clamped to zero.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["covariance_from_sums", "frechet_distance", "symmetric_sqrtm", "trace_sqrt_product"]


def _check_square(name: str, matrix: Tensor) -> None:
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {list(matrix.shape)}")
    if not torch.isfinite(matrix).all():
        raise ValueError(f"{name} contains {int((~torch.isfinite(matrix)).sum())} NaN/inf entries")


def symmetric_sqrtm(matrix: Tensor) -> Tensor:
    """Principal square root of a symmetric positive semi-definite matrix [D, D], computed in float64.

    ``V diag(sqrt(max(λ, 0))) Vᵀ`` from ``torch.linalg.eigh``; the input is symmetrised first so round-off
    asymmetry in a covariance cannot leak into the result. Returns float64.
    """
    _check_square("matrix", matrix)
    m = matrix.to(torch.float64)  # [D, D]
    m = (m + m.T) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(m)  # [D], [D, D]
    root = eigenvalues.clamp(min=0).sqrt()  # [D]
    return (eigenvectors * root) @ eigenvectors.T  # [D, D]


def trace_sqrt_product(sigma1: Tensor, sigma2: Tensor) -> Tensor:
    """tr((Σ₁ Σ₂)^{1/2}) for symmetric PSD Σ₁, Σ₂ [D, D]: the sum of singular values of √Σ₁√Σ₂ (float64 scalar)."""
    _check_square("sigma1", sigma1)
    _check_square("sigma2", sigma2)
    if sigma1.shape != sigma2.shape:
        raise ValueError(f"covariances differ in shape: {list(sigma1.shape)} vs {list(sigma2.shape)}")
    product = symmetric_sqrtm(sigma1) @ symmetric_sqrtm(sigma2)  # [D, D]
    return torch.linalg.svdvals(product).sum()


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> Tensor:
    """Squared Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂); all math in float64, returns a float64 scalar.

    Shapes: μ [D], Σ [D, D]. Raises ValueError on mismatched shapes or non-finite statistics (a NaN feature
    would otherwise silently produce a NaN or, worse, a plausible-looking number).
    """
    for name, mu in (("mu1", mu1), ("mu2", mu2)):
        if mu.ndim != 1:
            raise ValueError(f"{name} must be a vector [D], got shape {list(mu.shape)}")
        if not torch.isfinite(mu).all():
            raise ValueError(f"{name} contains NaN/inf entries")
    if mu1.shape != mu2.shape:
        raise ValueError(f"means differ in length: {mu1.shape[0]} vs {mu2.shape[0]}")
    if sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(f"sigma1 has shape {list(sigma1.shape)}, expected [{mu1.shape[0]}, {mu1.shape[0]}]")
    diff = mu1.to(torch.float64) - mu2.to(torch.float64)  # [D]
    trace_cross = trace_sqrt_product(sigma1, sigma2)
    return diff @ diff + torch.trace(sigma1.to(torch.float64)) + torch.trace(sigma2.to(torch.float64)) - 2 * trace_cross


def covariance_from_sums(feature_sum: Tensor, outer_sum: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """Mean [D] and unbiased covariance [D, D] (divisor N − 1, as TF-GAN and numpy.cov) from streaming sums.

    ``feature_sum`` = Σ xᵢ [D], ``outer_sum`` = Σ xᵢ xᵢᵀ [D, D], both float64, over ``count`` = N ≥ 2 samples.
    """
    if count < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {count}")
    mean = feature_sum.to(torch.float64) / count  # [D]
    cov = (outer_sum.to(torch.float64) - count * torch.outer(mean, mean)) / (count - 1)  # [D, D]
    return mean, (cov + cov.T) / 2
