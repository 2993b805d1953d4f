"""Normalised <-> voxel <-> world conversions, checked by evaluating densities in both frames."""

import numpy as np
import pytest
import torch

from medgauss.gaussians import (
    Gaussians,
    gaussians_to_normalized,
    gaussians_to_world,
    normalized_to_voxel_matrix,
    normalized_to_world_matrix,
    transform_points,
)


def density(g: Gaussians, x: torch.Tensor) -> torch.Tensor:
    """Sum of the Gaussians at points x [M,3] for batch 0, float64, no truncation."""
    r = x[:, None, :] - g.means[0][None]
    q = torch.einsum("mni,nij,mnj->mn", r, g.precision()[0], r)
    return (g.intensities[0] * torch.exp(-0.5 * q)).sum(-1)


def random_gaussians(n=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return Gaussians(torch.rand(1, n, 3, generator=gen, dtype=torch.float64),
                     torch.rand(1, n, 3, generator=gen, dtype=torch.float64) * 0.1 + 0.02,
                     torch.randn(1, n, 4, generator=gen, dtype=torch.float64),
                     torch.rand(1, n, generator=gen, dtype=torch.float64) + 0.5)


def test_voxel_centres_sit_at_half_integers_over_n():
    m = normalized_to_voxel_matrix((4, 5, 8))
    u = torch.tensor([[0.5 / 4, 0.5 / 5, 0.5 / 8], [3.5 / 4, 4.5 / 5, 7.5 / 8], [0.0, 0.0, 0.0]], dtype=torch.float64)
    idx = transform_points(u, m)
    assert torch.allclose(idx, torch.tensor([[0.0, 0, 0], [3, 4, 7], [-0.5, -0.5, -0.5]], dtype=torch.float64))


AFFINES = {
    "spacing_iso": dict(spacing=(1.5, 1.5, 1.5)),
    "ras_flip_perm": dict(affine=[[0, 0, -1.5, 120.0], [0, -1.5, 0, 80.0], [1.5, 0, 0, -40.0], [0, 0, 0, 1]]),
    "rotated": dict(affine=np.block([[1.2 * np.array([[0.6, -0.8, 0], [0.8, 0.6, 0], [0, 0, 1.0]]),
                                      np.array([[3.0], [1.0], [-2.0]])], [np.zeros((1, 3)), np.ones((1, 1))]])),
    "anisotropic": dict(spacing=(2.5, 0.7, 0.7)),
}


@pytest.mark.parametrize("name", list(AFFINES))
def test_world_gaussians_have_the_same_density_at_mapped_points(name):
    shape = (32, 32, 32) if name != "anisotropic" else (20, 40, 48)
    kw = AFFINES[name]
    g = random_gaussians()
    gw = gaussians_to_world(g, shape, **kw)
    u = torch.rand(50, 3, dtype=torch.float64)
    x = transform_points(u, normalized_to_world_matrix(shape, **kw))
    assert torch.allclose(density(gw, x), density(g, u), rtol=1e-9, atol=1e-12)
    back = gaussians_to_normalized(gw, shape, **kw)
    assert torch.allclose(back.covariance(), g.covariance(), atol=1e-12)
    assert torch.allclose(back.means, g.means, atol=1e-12)


def test_exact_path_is_differentiable():
    g = random_gaussians(n=2)
    affine = torch.tensor(AFFINES["ras_flip_perm"]["affine"], dtype=torch.float64)

    def f(means, scales, quats):
        gw = gaussians_to_world(Gaussians(means, scales, quats, g.intensities), (16, 16, 16), affine=affine)
        return gw.means, gw.covariance()

    assert torch.autograd.gradcheck(
        f, (g.means.clone().requires_grad_(), g.scales.clone().requires_grad_(), g.quats.clone().requires_grad_()))


def test_conflicting_or_bad_frames_raise():
    with pytest.raises(ValueError, match="either spacing or affine"):
        normalized_to_world_matrix((4, 4, 4), spacing=(1, 1, 1), affine=torch.eye(4))
    with pytest.raises(ValueError, match="shape"):
        normalized_to_world_matrix((4, 4), spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        normalized_to_world_matrix((4, 4, 4), spacing=(1, 0, 1))
    with pytest.raises(ValueError, match="singular"):
        normalized_to_world_matrix((4, 4, 4), affine=torch.zeros(4, 4))
