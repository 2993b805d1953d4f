"""The contract every render backend follows (medgauss/render/_common.py), tested across backends.

* Valid Gaussians are those with finite parameters and positive scales, however anisotropic: every
  backend renders scales such as ``(1e-4, 1, 1)`` to the same finite values and gradients, matching
  an independent float64 reference written here (each Gaussian in its whitened frame, from scipy
  rotations: no precision matrix, no medgauss code).
* Non-finite parameters are rejected at the entry of ``splat`` and ``project`` with the same
  ``ValueError`` naming the field, for every backend (also for containers built with
  ``validate=False``, which skip the container's own checks).
* Empty batches (``B = 0``) and empty Gaussian sets give zeros of the right shape and dtype, and zero
  (not missing) gradients, for every backend.

Triton runs in its interpreter (TRITON_INTERPRET=1, tests/conftest.py), so sizes are tiny.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from medgauss.gaussians import Gaussians
from medgauss.geometry import ConeBeamGeometry, ParallelBeamGeometry
from medgauss.render import project, splat

BACKENDS = ["torch", "numba", "triton"]
FIELDS = ("means", "scales", "quats", "intensities")


# ------------------------------------------------------------------------------- independent references
def _axes_and_scales(g: Gaussians) -> tuple[np.ndarray, np.ndarray]:
    """Rotation matrices ``[B, N, 3, 3]`` (columns = the Gaussians' axes, from scipy) and scales, float64."""
    quats = g.quats.detach().double().numpy()
    rot = Rotation.from_quat(quats.reshape(-1, 4)[:, [1, 2, 3, 0]]).as_matrix().reshape(*quats.shape[:2], 3, 3)
    return rot, g.scales.detach().double().numpy()


def whitened_points(g: Gaussians, points: np.ndarray, cutoff: float | None) -> np.ndarray:
    """``[B, M]`` sum of ``I exp(-|S^-1 R^T (x - mu)|^2 / 2)`` at ``points [B, M, 3]`` (float64)."""
    rot, scales = _axes_and_scales(g)
    means = g.means.detach().double().numpy()
    inten = g.intensities.detach().double().numpy()
    out = np.zeros(points.shape[:2])
    for b in range(means.shape[0]):
        for i in range(means.shape[1]):
            y = (points[b] - means[b, i]) @ rot[b, i] / scales[b, i]
            q = (y * y).sum(-1)
            term = inten[b, i] * np.exp(-0.5 * q)
            out[b] += term if cutoff is None else np.where(q < cutoff * cutoff, term, 0.0)
    return out


def whitened_rays(g: Gaussians, geo, cutoff: float | None) -> np.ndarray:
    """``[B, V, R, C]`` line integrals: in the whitened frame ``y = S^-1 R^T (x - mu)`` the ray
    ``y0 + t e`` integrates a unit Gaussian to ``sqrt(2 pi) / |e| exp(-|y0 x e / |e||^2 / 2)``."""
    o, d = (t.numpy() for t in geo.rays(dtype=torch.float64))
    rot, scales = _axes_and_scales(g)
    means = g.means.detach().double().numpy()
    inten = g.intensities.detach().double().numpy()
    out = np.zeros((means.shape[0], *o.shape[:3]))
    for b in range(means.shape[0]):
        for i in range(means.shape[1]):
            y0 = (o - means[b, i]) @ rot[b, i] / scales[b, i]
            e = d @ rot[b, i] / scales[b, i]
            e_len = np.linalg.norm(e, axis=-1)
            m = (np.cross(y0, e / e_len[..., None]) ** 2).sum(-1)
            term = inten[b, i] * math.sqrt(2 * math.pi) / e_len * np.exp(-0.5 * m)
            out[b] += term if cutoff is None else np.where(m < cutoff * cutoff, term, 0.0)
    return out


# ------------------------------------------------------------------------------------ extreme Gaussians
def _random_rotations(gen: torch.Generator, b: int, n: int) -> torch.Tensor:
    return torch.randn(b, n, 4, generator=gen, dtype=torch.float64)


def thin_gaussians_normalised(dtype: torch.dtype) -> Gaussians:
    """Sheets ``(1e-4, 1, 1)`` and ``(1e-4, 0.3, 0.2)``, a needle ``(1e-4, 1e-3, 0.5)`` and an ordinary
    Gaussian, randomly rotated, in normalised coordinates."""
    gen = torch.Generator().manual_seed(3)
    scales = torch.tensor([[[1e-4, 1.0, 1.0], [1e-4, 0.3, 0.2], [1e-4, 1e-3, 0.5], [0.1, 0.2, 0.15]]],
                          dtype=torch.float64)
    means = torch.rand(1, 4, 3, generator=gen, dtype=torch.float64) * 0.5 + 0.25
    inten = torch.tensor([[1.0, -0.7, 0.8, 0.5]], dtype=torch.float64)
    return Gaussians(means, scales, _random_rotations(gen, 1, 4), inten).to(dtype)


def points_near_the_gaussians(g: Gaussians, m_per: int = 24) -> torch.Tensor:
    """``[1, M, 3]`` points a few thicknesses from each Gaussian's centre along its own axes (where a
    thin Gaussian has values worth comparing; voxel centres almost never are), inside ``[0, 1]``."""
    gen = torch.Generator().manual_seed(4)
    rot, scales = _axes_and_scales(g)
    means = g.means.detach().double().numpy()
    pts = []
    for i in range(means.shape[1]):
        coef = (torch.rand(m_per, 3, generator=gen, dtype=torch.float64).numpy() - 0.5) * 5  # +-2.5 sigma
        pts.append(means[0, i] + (coef * np.minimum(scales[0, i], 0.2)) @ rot[0, i].T)
    return torch.from_numpy(np.clip(np.concatenate(pts), 0.0, 1.0))[None].to(g.dtype)


def _leaves(g: Gaussians) -> list[torch.Tensor]:
    return [getattr(g, f).detach().clone().requires_grad_() for f in FIELDS]


def _assert_grads_match_torch(out, leaves, g: Gaussians, dtype, render_torch) -> None:
    """Gradients of ``out`` (a backend's render of ``leaves``) under a shared cotangent are finite and equal
    those of the torch reference ``render_torch(Gaussians)`` on fresh leaves of ``g``."""
    cot = torch.linspace(-1, 1, out.numel(), dtype=dtype).reshape(out.shape)
    grads = torch.autograd.grad((out * cot).sum(), leaves)
    ref_leaves = _leaves(g)
    ref_grads = torch.autograd.grad((render_torch(Gaussians(*ref_leaves)) * cot).sum(), ref_leaves)
    rel = 1e-7 if dtype == torch.float64 else 1e-3
    for name, got, exp in zip(FIELDS, grads, ref_grads):
        assert bool(torch.isfinite(got).all()), name
        scale = exp.abs().max().item()
        assert scale > 0, name
        assert (got - exp).abs().max().item() <= rel * scale, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_anisotropy_splat_same_finite_values_in_every_backend(backend, dtype):
    g = thin_gaussians_normalised(dtype)
    points = points_near_the_gaussians(g)
    leaves = _leaves(g)
    out = splat(Gaussians(*leaves), (5, 6, 7), points=points, cutoff=None, backend=backend)
    want = whitened_points(g, points.double().numpy(), None)
    assert np.abs(want).max() > 0.5 and (np.abs(want) > 1e-2).sum() > 40  # the sheets are actually hit
    tol = 1e-9 if dtype == torch.float64 else 3e-3  # float32: rounding of r / 1e-4 in the sheets
    np.testing.assert_allclose(out.detach().double().numpy(), want, rtol=0, atol=tol * np.abs(want).max())
    # Gradients: finite, and equal to the torch reference's (same dtype).
    _assert_grads_match_torch(out, leaves, g, dtype,
                              lambda h: splat(h, (5, 6, 7), points=points, cutoff=None, backend="torch"))
    # Dense voxels (cut off at 3): finite, and the same in every backend.
    dense = splat(g, (5, 6, 7), cutoff=3.0, backend=backend)
    assert bool(torch.isfinite(dense).all())
    torch.testing.assert_close(dense, splat(g, (5, 6, 7), cutoff=3.0, backend="torch"),
                               rtol=0, atol=1e-9 if dtype == torch.float64 else 3e-3)


def thin_gaussians_world(dtype: torch.dtype) -> Gaussians:
    """A ``(1e-4, 1, 1)`` mm plate, a ``(1e-4, 8, 12)`` mm plate, a needle and an ordinary Gaussian (mm)."""
    gen = torch.Generator().manual_seed(5)
    scales = torch.tensor([[[1e-4, 1.0, 1.0], [1e-4, 8.0, 12.0], [1e-4, 1e-3, 15.0], [3.0, 5.0, 4.0]]],
                          dtype=torch.float64)
    means = (torch.rand(1, 4, 3, generator=gen, dtype=torch.float64) - 0.5) * 16
    inten = torch.tensor([[1.0, 2.0, -0.5, 0.3]], dtype=torch.float64)
    return Gaussians(means, scales, _random_rotations(gen, 1, 4), inten).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["cone", "parallel"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_extreme_anisotropy_project_same_finite_values_in_every_backend(backend, kind, dtype):
    common = dict(det_shape=(16, 17), det_spacing=(1.5, 1.6), vol_shape=(8, 8, 8), vol_spacing=(4.0, 4.0, 4.0),
                  angles=[0.4, 1.7])
    geo = ConeBeamGeometry(dso=400.0, dsd=600.0, **common) if kind == "cone" else ParallelBeamGeometry(**common)
    g = thin_gaussians_world(dtype)
    leaves = _leaves(g)
    out = project(Gaussians(*leaves), geo, cutoff=3.0, backend=backend)
    want = whitened_rays(g, geo, 3.0)
    assert (np.abs(want) > 1e-3 * np.abs(want).max()).sum() > 50
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    np.testing.assert_allclose(out.detach().double().numpy(), want, rtol=0, atol=tol * np.abs(want).max())
    _assert_grads_match_torch(out, leaves, g, dtype, lambda h: project(h, geo, cutoff=3.0, backend="torch"))


def test_beyond_float64_anisotropy_is_rendered_at_the_limit_not_rejected():
    """Scales 1e-10 : 1 (condition number 1e20) exceed what float64 can factor: every backend renders
    the same finite values (the thin axis widened to the pivot floor, still far below a voxel)
    instead of raising, and points in the sheets get their exact values."""
    gen = torch.Generator().manual_seed(6)
    g = Gaussians(torch.full((1, 2, 3), 0.5, dtype=torch.float64),
                  torch.tensor([[[1e-9, 0.3, 0.3], [0.2, 1e-10, 0.25]]], dtype=torch.float64),
                  _random_rotations(gen, 1, 2), torch.tensor([[1.0, 0.5]], dtype=torch.float64))
    rot, _ = _axes_and_scales(g)
    centre = np.full(3, 0.5)
    in_plane = [centre, centre + 0.1 * rot[0, 0][:, 1], centre - 0.07 * rot[0, 0][:, 2],
                centre + 0.05 * rot[0, 1][:, 0], centre + 0.1 * rot[0, 1][:, 2]]
    points = torch.from_numpy(np.stack(in_plane))[None]
    want = whitened_points(g, points.numpy(), 3.0)
    assert want[0, 0] == 1.5 and (want[0, 1:] > 0.4).all()
    for backend in BACKENDS:
        dense = splat(g, (4, 5, 6), cutoff=3.0, backend=backend)
        assert bool(torch.isfinite(dense).all()) and dense.abs().max() <= 1.5, backend
        at_points = splat(g, (4, 5, 6), points=points, cutoff=3.0, backend=backend)
        np.testing.assert_allclose(at_points.numpy(), want, rtol=1e-6, err_msg=backend)


# ----------------------------------------------------------------------------------- non-finite input
def _valid(world: bool) -> Gaussians:
    gen = torch.Generator().manual_seed(7)
    means = torch.rand(1, 3, 3, generator=gen, dtype=torch.float64) * 0.5 + 0.25
    scales = torch.rand(1, 3, 3, generator=gen, dtype=torch.float64) * 0.1 + 0.1
    if world:
        means, scales = (means - 0.5) * 20, scales * 20
    return Gaussians(means, scales, _random_rotations(gen, 1, 3), torch.ones(1, 3, dtype=torch.float64))


def _small_cone():
    return ConeBeamGeometry(dso=300.0, dsd=500.0, det_shape=(4, 5), det_spacing=(8.0, 8.0), vol_shape=(8, 8, 8),
                            vol_spacing=(4.0, 4.0, 4.0), angles=[0.3])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["splat", "project"])
@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_gaussians_are_rejected_naming_the_field(backend, op, field, bad):
    g = _valid(world=op == "project")
    tensors = {f: getattr(g, f).clone() for f in FIELDS}
    tensors[field].view(-1)[1] = bad
    broken = Gaussians(*(tensors[f] for f in FIELDS), validate=False)
    with pytest.raises(ValueError, match=f"{field} contains non-finite values"):
        if op == "splat":
            splat(broken, (4, 5, 6), backend=backend)
        else:
            project(broken, _small_cone(), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_positive_scales_and_bad_linear_map_are_rejected(backend):
    g = _valid(world=False)
    scales = g.scales.clone()
    scales[0, 2, 1] = 0.0
    with pytest.raises(ValueError, match="scales must be strictly positive"):
        splat(Gaussians(g.means, scales, g.quats, g.intensities, validate=False), (4, 5, 6), backend=backend)
    linear = torch.eye(3, dtype=torch.float64)
    linear[1, 2] = math.nan
    with pytest.raises(ValueError, match="linear_map contains non-finite values"):
        project(Gaussians(g.means, g.scales, g.quats, g.intensities, linear_map=linear, validate=False),
                _small_cone(), backend=backend)


def test_the_torch_splat_no_longer_returns_zeros_for_a_nan_mean():
    g = _valid(world=False)
    means = g.means.clone()
    means[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="means contains non-finite"):
        splat(Gaussians(means, g.scales, g.quats, g.intensities, validate=False), (4, 5, 6), backend="torch")


# ------------------------------------------------------------------------------------------ empty input
def _empty(b: int, n: int, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    return [torch.zeros(b, n, 3, dtype=dtype).requires_grad_(), torch.ones(b, n, 3, dtype=dtype).requires_grad_(),
            torch.ones(b, n, 4, dtype=dtype).requires_grad_(), torch.ones(b, n, dtype=dtype).requires_grad_()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b, n", [(0, 3), (0, 0), (2, 0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_empty_inputs_give_empty_outputs_and_zero_gradients(backend, b, n, dtype):
    leaves = _empty(b, n, dtype)
    g = Gaussians(*leaves)
    outs = [splat(g, (3, 4, 5), backend=backend),
            splat(g, (3, 4, 5), points=torch.rand(b, 6, 3, dtype=dtype), backend=backend),
            project(g, _small_cone(), backend=backend),
            project(g, _small_cone(), view_ids=[0], cutoff=None, backend=backend)]
    shapes = [(b, 1, 3, 4, 5), (b, 6), (b, 1, 4, 5), (b, 1, 4, 5)]
    for out, shape in zip(outs, shapes):
        assert tuple(out.shape) == shape and out.dtype == dtype and not out.any()
        grads = torch.autograd.grad(out.sum(), leaves, retain_graph=True)  # the quats' normalisation is shared
        for leaf, grad in zip(leaves, grads):
            assert grad is not None and grad.shape == leaf.shape and not grad.any()
