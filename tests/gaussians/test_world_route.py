"""Normalised -> world Gaussians through a non-similarity map (anisotropic spacing, non-cubic grid):
exact covariance, exact densities, and finite-difference gradients of ``project`` at every input,
including isotropic Gaussians (where an eigen-decomposition has no gradient)."""

import math

import pytest
import torch

from medgauss.gaussians import Gaussians, gaussians_to_world, normalized_to_world_matrix, transform_points
from medgauss.geometry import ConeBeamGeometry
from medgauss.render import project

SHAPE = (6, 9, 11)  # non-cubic (D, H, W)
SPACING = (3.0, 1.25, 0.8)  # anisotropic, z coarsest as on a clinical CT grid


def _geometry() -> ConeBeamGeometry:
    return ConeBeamGeometry(dso=200.0, dsd=300.0, det_shape=(7, 9), det_spacing=(2.0, 2.0), vol_shape=SHAPE,
                            vol_spacing=SPACING, angles=torch.tensor([0.3, 1.9]))


def _gaussians(isotropic: bool, seed: int = 0) -> Gaussians:
    gen = torch.Generator().manual_seed(seed)
    n = 3
    means = 0.3 + 0.4 * torch.rand(1, n, 3, generator=gen, dtype=torch.float64)
    if isotropic:
        scales = torch.full((1, n, 3), 0.15, dtype=torch.float64)
    else:
        scales = 0.08 + 0.15 * torch.rand(1, n, 3, generator=gen, dtype=torch.float64)
    quats = torch.randn(1, n, 4, generator=gen, dtype=torch.float64)
    return Gaussians(means, scales, quats, 0.5 + torch.rand(1, n, generator=gen, dtype=torch.float64))


def test_world_covariance_is_m_sigma_mt_and_densities_match():
    geo = _geometry()
    g = _gaussians(isotropic=False)
    m = normalized_to_world_matrix(SHAPE, affine=geo.volume_affine)
    gw = gaussians_to_world(g, SHAPE, affine=geo.volume_affine)
    lin = m[:3, :3]
    assert torch.allclose(gw.covariance(), lin @ g.covariance() @ lin.T, rtol=1e-12, atol=1e-12)
    assert torch.allclose(gw.precision() @ gw.covariance(), torch.eye(3, dtype=torch.float64).expand(1, 3, 3, 3),
                          atol=1e-10)
    # density at a world point equals the normalised density at its preimage (brute force, float64)
    u = torch.rand(40, 3, dtype=torch.float64)
    x = transform_points(u, m)

    def dens(gg, pts):
        r = pts[:, None] - gg.means[0][None]
        return (gg.intensities[0] * torch.exp(-0.5 * torch.einsum("mni,nij,mnj->mn", r, gg.precision()[0], r))).sum(-1)

    assert torch.allclose(dens(gw, x), dens(g, u), rtol=1e-10, atol=1e-12)
    # canonical() (export form) keeps the covariance
    assert gw.canonical().linear_map is None
    assert torch.allclose(gw.canonical().covariance(), gw.covariance(), atol=1e-10)


@pytest.mark.parametrize("isotropic", [True, False], ids=["isotropic", "anisotropic"])
def test_project_through_world_route_passes_gradcheck(isotropic):
    geo = _geometry()
    g = _gaussians(isotropic)
    affine = geo.volume_affine

    def f(means, scales, quats, intensities):
        gw = gaussians_to_world(Gaussians(means, scales, quats, intensities), SHAPE, affine=affine)
        return project(gw, geo, cutoff=None, backend="torch")

    args = tuple(t.clone().requires_grad_() for t in (g.means, g.scales, g.quats, g.intensities))
    out = f(*args)
    assert out.abs().max() > 1e-3  # the Gaussians are seen by the detector
    torch.autograd.backward(out.sum())
    for t in args:
        assert torch.isfinite(t.grad).all()
    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_world_route_projection_equals_brute_force_line_integral():
    """An isotropic normalised Gaussian is an axis-aligned anisotropic one in world mm: integrate it
    numerically along the central pixel's ray and compare."""
    geo = _geometry()
    f64 = dict(dtype=torch.float64)
    g = Gaussians(torch.tensor([[[0.5, 0.5, 0.5]]], **f64), torch.full((1, 1, 3), 0.1, **f64),
                  torch.tensor([[[1.0, 0.0, 0.0, 0.0]]], **f64), torch.ones(1, 1, **f64))
    gw = gaussians_to_world(g, SHAPE, affine=geo.volume_affine)
    img = project(gw, geo, cutoff=None, backend="torch")[0, 0]
    origins, dirs = geo.rays(view_ids=[0], dtype=torch.float64)
    o, d = origins[0, 3, 4], dirs[0, 3, 4]
    t = torch.linspace(-400, 400, 400001, dtype=torch.float64)
    x = o + t[:, None] * d
    sig = torch.tensor([0.1 * SHAPE[2] * SPACING[2], 0.1 * SHAPE[1] * SPACING[1], 0.1 * SHAPE[0] * SPACING[0]],
                       dtype=torch.float64)  # world (x, y, z) std: normalised 0.1 of each axis' length
    centre = gw.means[0, 0]
    vals = torch.exp(-0.5 * (((x - centre) / sig) ** 2).sum(-1))
    integral = torch.trapezoid(vals, t)
    assert math.isclose(float(img[3, 4]), float(integral), rel_tol=1e-6)


def test_linear_map_survives_indexing_cat_and_save(tmp_path):
    geo = _geometry()
    gw = gaussians_to_world(_gaussians(False), SHAPE, affine=geo.volume_affine)
    plain = _gaussians(True, seed=3)
    both = Gaussians.cat([gw, plain])
    assert both.num_gaussians == 6
    assert torch.allclose(both[:, :3].covariance(), gw.covariance())
    assert torch.allclose(both[:, 3:].covariance(), plain.covariance())
    gw.save(tmp_path / "g.safetensors")
    back = Gaussians.load(tmp_path / "g.safetensors")
    assert torch.allclose(back.covariance(), gw.covariance())


def test_bad_linear_map_raises():
    g = _gaussians(False)
    with pytest.raises(ValueError, match="linear_map must have shape"):
        Gaussians(g.means, g.scales, g.quats, g.intensities, linear_map=torch.eye(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="linear_map must be invertible"):
        Gaussians(g.means, g.scales, g.quats, g.intensities, linear_map=torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="linear_map contains non-finite"):
        Gaussians(g.means, g.scales, g.quats, g.intensities,
                  linear_map=torch.full((3, 3), float("nan"), dtype=torch.float64))
