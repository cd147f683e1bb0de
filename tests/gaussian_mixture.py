"""The exactly solvable 2-D Gaussian mixture every sampler test checks against: its parameters, how its points are
packed, and the distribution check."""

from __future__ import annotations

import torch

from framework.layers.packing import PackedSequence

MEANS = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], dtype=torch.float64)  # [K, 2]
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)  # [K]
STD = 0.3
NUM_POINTS = 4000


def sample_mixture(n: int, generator: torch.Generator) -> torch.Tensor:
    k = torch.multinomial(WEIGHTS.float(), n, replacement=True, generator=generator)
    return (MEANS[k] + STD * torch.randn(n, 2, generator=generator, dtype=torch.float64)).float()


def one_sample_pack(tokens: torch.Tensor) -> PackedSequence:
    """All points as one sample with a (1, 1, N) token grid."""
    return PackedSequence.from_grids([tokens.reshape(1, 1, -1, tokens.shape[-1])])


def varied_pack(tokens: torch.Tensor, lengths: list[int]) -> PackedSequence:
    """The points split into samples of different token counts (different per-sample shifts)."""
    assert sum(lengths) == tokens.shape[0]
    return PackedSequence.from_grids([g.reshape(1, 1, -1, tokens.shape[-1]) for g in tokens.split(lengths)])


def assert_matches_mixture(points: torch.Tensor, overall_moments: bool = True) -> None:
    """Per-component mass, mean and spread of 4000 points, plus (``overall_moments``) the overall mean and covariance.

    Tolerances are several standard errors (mass: 0.008, component mean and std: <= 0.015, overall mean: ~0.03)
    plus room for a first-order sampler's O(1/steps) error."""
    points = points.double()
    assert torch.isfinite(points).all()
    nearest = torch.cdist(points, MEANS).argmin(dim=1)  # components are >= 13 std apart: no ambiguity
    for k in range(len(WEIGHTS)):
        members = points[nearest == k]
        mass = len(members) / len(points)
        assert abs(mass - WEIGHTS[k].item()) < 0.03, f"component {k}: mass {mass:.3f} vs {WEIGHTS[k].item()}"
        err = (members.mean(0) - MEANS[k]).abs().max().item()
        assert err < 0.05, f"component {k}: mean {members.mean(0).tolist()} vs {MEANS[k].tolist()}"
        std = members.std(0)
        assert ((std - STD).abs() < 0.15 * STD).all(), f"component {k}: std {std.tolist()} vs {STD}"
    if not overall_moments:
        return
    mean = (WEIGHTS[:, None] * MEANS).sum(0)
    centred = MEANS - mean
    cov = (WEIGHTS[:, None, None] * centred[:, :, None] * centred[:, None, :]).sum(0) + STD**2 * torch.eye(2)
    assert (points.mean(0) - mean).abs().max() < 0.1, f"mean {points.mean(0).tolist()} vs {mean.tolist()}"
    assert (points.T.cov() - cov).abs().max() < 0.15, f"cov {points.T.cov().tolist()} vs {cov.tolist()}"
