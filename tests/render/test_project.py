"""project(): the torch reference against independent references, the public API, and bad input.

References written here, sharing no code with medgauss: the line integral of each Gaussian in its
whitened frame (covariance factor from scipy rotations, no precision matrix), brute-force numeric
quadrature along each ray, and conservation of mass for parallel beams. Other backends are compared
with the reference in test_project_backends.py.
"""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from medgauss.gaussians import Gaussians
from medgauss.geometry import ConeBeamGeometry, ParallelBeamGeometry
from medgauss.render.xray import detector_rays, project


def cone(det=(9, 11), spacing=(6.0, 5.0), views=3, **kw):
    return ConeBeamGeometry(dso=400.0, dsd=650.0, det_shape=det, det_spacing=spacing, vol_shape=(8, 8, 8),
                            vol_spacing=(4.0, 4.0, 4.0), angles=torch.linspace(0.3, 5.0, views), **kw)


def parallel(det=(9, 11), spacing=(4.0, 3.5), views=3, **kw):
    return ParallelBeamGeometry(det_shape=det, det_spacing=spacing, vol_shape=(8, 8, 8),
                                vol_spacing=(4.0, 4.0, 4.0), angles=torch.linspace(0.3, 5.0, views), **kw)


GEOMETRIES = {"cone": cone, "parallel": parallel}


def some_gaussians(b=2, n=4, dtype=torch.float64, seed=0) -> Gaussians:
    """Anisotropic, rotated Gaussians of a few mm to a few cm, around the isocentre (world mm)."""
    gen = torch.Generator().manual_seed(seed)
    means = (torch.rand(b, n, 3, generator=gen, dtype=torch.float64) - 0.5) * 30
    scales = torch.rand(b, n, 3, generator=gen, dtype=torch.float64) * 6 + 2
    quats = torch.randn(b, n, 4, generator=gen, dtype=torch.float64)
    inten = torch.rand(b, n, generator=gen, dtype=torch.float64) + 0.2
    return Gaussians(means, scales, quats, inten).to(dtype)


def covariance_factors(g: Gaussians) -> np.ndarray:
    """``L [B, N, 3, 3]`` with ``Sigma = L L^T``, ``L = R diag(s)``, R from scipy (x, y, z, w order)."""
    quats = g.quats.detach().double().numpy()
    scales = g.scales.detach().double().numpy()
    rot = Rotation.from_quat(quats.reshape(-1, 4)[:, [1, 2, 3, 0]]).as_matrix()
    rot = rot.reshape(*quats.shape[:2], 3, 3)
    return rot * scales[..., None, :]


def rays64(geo):
    o, d = geo.rays(dtype=torch.float64)
    d = d / d.norm(dim=-1, keepdim=True)
    return o.numpy(), d.numpy()


def whitened_closed_form(g: Gaussians, geo, cutoff) -> np.ndarray:
    """Each Gaussian is a unit isotropic one after ``y = L^{-1} (x - mu)``; the ray becomes
    ``y0 + t e`` and its integral is ``sqrt(2 pi) / |e| exp(-|y0 x e_hat|^2 / 2)`` (dt = ds)."""
    o, d = rays64(geo)
    fac = covariance_factors(g)
    means = g.means.detach().double().numpy()
    inten = g.intensities.detach().double().numpy()
    out = np.zeros((means.shape[0], *o.shape[:3]))
    for b in range(means.shape[0]):
        for i in range(means.shape[1]):
            inv = np.linalg.inv(fac[b, i])
            y0 = (o - means[b, i]) @ inv.T
            e = d @ inv.T
            e_len = np.linalg.norm(e, axis=-1)
            perp = np.linalg.norm(np.cross(y0, e / e_len[..., None]), axis=-1)
            term = inten[b, i] * math.sqrt(2 * math.pi) / e_len * np.exp(-0.5 * perp**2)
            if cutoff is not None:
                term = np.where(perp**2 < cutoff**2, term, 0.0)
            out[b] += term
    return out


def quadrature(g: Gaussians, geo, samples=4001) -> np.ndarray:
    """Composite Simpson's rule for each ray over +-12 standard deviations around its closest point."""
    o, d = rays64(geo)
    fac = covariance_factors(g)
    means = g.means.detach().double().numpy()
    inten = g.intensities.detach().double().numpy()
    out = np.zeros((means.shape[0], *o.shape[:3]))
    weights = np.ones(samples)
    weights[1:-1:2], weights[2:-1:2] = 4, 2
    for b in range(means.shape[0]):
        for i in range(means.shape[1]):
            cov = fac[b, i] @ fac[b, i].T
            prec = np.linalg.inv(cov)
            t_mid = np.einsum("vrck,vrck->vrc", means[b, i] - o, d)
            half = 12 * math.sqrt(np.linalg.eigvalsh(cov).max())
            ts = np.linspace(-half, half, samples)
            x = o[..., None, :] + (t_mid[..., None] + ts)[..., None] * d[..., None, :] - means[b, i]
            q = np.einsum("...k,kl,...l->...", x, prec, x)
            dens = np.exp(-0.5 * q)
            out[b] += inten[b, i] * (dens * weights).sum(-1) * (ts[1] - ts[0]) / 3
    return out


@pytest.mark.parametrize("kind", GEOMETRIES)
@pytest.mark.parametrize("cutoff", [3.0, None])
def test_matches_whitened_closed_form(kind, cutoff):
    geo = GEOMETRIES[kind]()
    g = some_gaussians()
    out = project(g, geo, cutoff=cutoff, backend="torch")
    assert out.shape == (2, 3, 9, 11) and out.dtype == torch.float64
    ref = whitened_closed_form(g, geo, cutoff)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-10, atol=1e-12)
    assert (ref > 0.1).sum() > 20  # the Gaussians are actually seen


@pytest.mark.parametrize("kind", GEOMETRIES)
def test_matches_numeric_quadrature(kind):
    geo = GEOMETRIES[kind](det=(5, 6), views=2)
    g = some_gaussians(b=1, n=3, seed=3)
    out = project(g, geo, cutoff=None, backend="torch")
    np.testing.assert_allclose(out.numpy(), quadrature(g, geo), rtol=1e-8, atol=1e-12)


def test_parallel_beam_conserves_mass():
    """Summing a parallel projection over the detector integrates the Gaussian over all space:
    ``I (2 pi)^{3/2} s_x s_y s_z`` (pixel area times the sum, on a fine detector)."""
    geo = parallel(det=(64, 64), spacing=(1.0, 1.0), views=2)
    g = Gaussians(torch.tensor([[[2.0, -1.0, 1.5]]], dtype=torch.float64),
                  torch.tensor([[[3.0, 5.0, 2.5]]], dtype=torch.float64),
                  torch.tensor([[[0.9, 0.2, -0.3, 0.1]]], dtype=torch.float64),
                  torch.tensor([[0.7]], dtype=torch.float64))
    out = project(g, geo, cutoff=None, backend="torch")
    mass = 0.7 * (2 * math.pi) ** 1.5 * 3.0 * 5.0 * 2.5
    np.testing.assert_allclose(out.sum(dim=(-1, -2)).numpy(), mass, rtol=1e-6)


def test_cone_beam_magnifies():
    """A small Gaussian at the isocentre seen in cone beam: the projection is its parallel one
    magnified by dsd/dso on the detector (sum scales with the magnification squared)."""
    f64 = dict(dtype=torch.float64)
    g = Gaussians(torch.zeros(1, 1, 3, **f64), torch.full((1, 1, 3), 2.0, **f64),
                  torch.tensor([[[1.0, 0, 0, 0]]], **f64), torch.ones(1, 1, **f64))
    geo = ConeBeamGeometry(dso=1000.0, dsd=1500.0, det_shape=(61, 61), det_spacing=(0.5, 0.5),
                           vol_shape=(4, 4, 4), vol_spacing=(1.0, 1.0, 1.0), angles=[0.0])
    img = project(g, geo, cutoff=None, backend="torch")[0, 0]
    assert img[30, 30] == img.max()
    np.testing.assert_allclose(img[30, 30].item(), math.sqrt(2 * math.pi) * 2.0, rtol=1e-12)
    mass = img.sum().item() * 0.25 / 1.5**2
    np.testing.assert_allclose(mass, (2 * math.pi) ** 1.5 * 8.0, rtol=1e-3)  # small-angle magnification


def test_cutoff_rule():
    """With a cutoff, a ray gets a Gaussian exactly where its smallest Mahalanobis distance is below it."""
    geo = cone()
    g = some_gaussians(b=1, n=1, seed=5)
    full = project(g, geo, cutoff=None, backend="torch").numpy()
    cut = project(g, geo, cutoff=1.5, backend="torch").numpy()
    peak = g.intensities.item() * math.sqrt(2 * math.pi) / whitened_e_len(g, geo)
    inside = full > peak * math.exp(-0.5 * 1.5**2) * (1 + 1e-9)
    outside = full < peak * math.exp(-0.5 * 1.5**2) * (1 - 1e-9)
    assert inside.any() and outside.any()
    np.testing.assert_allclose(cut[inside], full[inside], rtol=1e-12)
    assert (cut[outside] == 0).all()


def whitened_e_len(g, geo):
    o, d = rays64(geo)
    inv = np.linalg.inv(covariance_factors(g)[0, 0])
    return np.linalg.norm(d @ inv.T, axis=-1)[None]


def test_float32_accurate_far_from_origin():
    """Source 1 m away, 1 mm Gaussians: float32 keeps the exponent accurate (no c - b^2/a cancellation)."""
    geo = ConeBeamGeometry(dso=1000.0, dsd=1500.0, det_shape=(12, 13), det_spacing=(0.4, 0.4),
                           vol_shape=(4, 4, 4), vol_spacing=(1.0, 1.0, 1.0), angles=[0.1, 2.0])
    g = Gaussians(torch.tensor([[[0.3, -0.2, 0.1], [-0.5, 0.6, -0.4]]], dtype=torch.float64),
                  torch.tensor([[[1.0, 0.6, 1.4], [0.8, 1.1, 0.5]]], dtype=torch.float64),
                  torch.tensor([[[0.9, 0.2, -0.3, 0.1], [0.1, 0.5, 0.5, -0.6]]], dtype=torch.float64),
                  torch.tensor([[1.0, 0.5]], dtype=torch.float64))
    ref = project(g, geo, cutoff=None, backend="torch")
    out32 = project(g.to(torch.float32), geo, cutoff=None, backend="torch")
    np.testing.assert_allclose(out32.double().numpy(), ref.numpy(), rtol=1e-4, atol=1e-5 * ref.max().item())


@pytest.mark.parametrize("kind", GEOMETRIES)
def test_gradcheck_torch(kind):
    geo = GEOMETRIES[kind](det=(3, 4), spacing=(8.0, 7.0), views=2)
    g0 = some_gaussians(b=1, n=2, seed=7)

    def fn(means, scales, quats, inten):
        g = Gaussians(means, scales, quats, inten, validate=False)
        return project(g, geo, cutoff=None, backend="torch")

    inputs = [t.clone().requires_grad_(True) for t in (g0.means, g0.scales, g0.quats, g0.intensities)]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def test_view_ids_select_views():
    geo = cone(views=4)
    g = some_gaussians()
    full = project(g, geo, backend="torch")
    part = project(g, geo, view_ids=[3, 1], backend="torch")
    torch.testing.assert_close(part, full[:, [3, 1]])
    torch.testing.assert_close(project(g, geo, view_ids=torch.tensor([2]), backend="torch"), full[:, 2:3])


def test_empty_gaussians_give_zeros_with_graph():
    geo = cone(det=(3, 4), views=1)
    inten = torch.zeros(1, 0, dtype=torch.float64, requires_grad=True)
    g = Gaussians(torch.zeros(1, 0, 3, dtype=torch.float64), torch.ones(1, 0, 3, dtype=torch.float64),
                  torch.ones(1, 0, 4, dtype=torch.float64), inten)
    out = project(g, geo, backend="torch")
    assert out.shape == (1, 1, 3, 4) and not out.any()
    out.sum().backward()
    assert inten.grad is not None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gaussians="not gaussians"), "gaussians must be"),
        (dict(geometry=object()), "geometry must be"),
        (dict(cutoff=-1.0), "cutoff"),
        (dict(cutoff=float("nan")), "cutoff"),
        (dict(view_ids=[0, 5]), r"view_ids must lie in \[0, 2\]"),
        (dict(view_ids=[-1]), "view_ids must lie"),
        (dict(view_ids=[0.5]), "view_ids must be integers"),
        (dict(view_ids=[[0, 1]]), "1-D"),
        (dict(view_ids=[]), "non-empty"),
        (dict(backend="cuda-magic"), "backend must be"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    args = dict(gaussians=some_gaussians(b=1, n=1), geometry=cone(), cutoff=3.0, view_ids=None,
                backend="torch")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        project(args.pop("gaussians"), args.pop("geometry"), **args)


def ewa_footprint(g: Gaussians, geo) -> torch.Tensor:
    """R²-Gaussian-style rasterised projection of ONE Gaussian in view 0 (written here as a peer):
    the perspective map to ray space ``(col, row, |x - S|)`` is linearised at the centre (EWA), the
    Gaussian becomes a 2-D Gaussian with covariance ``J Sigma J^T`` restricted to the detector, times
    the integration-bias factor ``sqrt(2 pi det(J Sigma J^T) / det(2-D block))``."""
    p = geo.projection_matrices()[0]
    source = geo.source_positions()[0]
    mu, cov = g.means[0, 0], g.covariance()[0, 0]

    def ray_space(x):
        h = p @ torch.cat([x, torch.ones(1, dtype=x.dtype)])
        return torch.stack([h[0] / h[2], h[1] / h[2], (x - source).norm()])

    jac = torch.autograd.functional.jacobian(ray_space, mu)
    centre = ray_space(mu)
    cov_ray = jac @ cov @ jac.T
    cov_2d = cov_ray[:2, :2]
    bias = math.sqrt(2 * math.pi) * torch.sqrt(torch.det(cov_ray) / torch.det(cov_2d))
    rows, cols = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in geo.det_shape), indexing="ij")
    delta = torch.stack([cols - centre[0], rows - centre[1]], -1)
    q = torch.einsum("...i,ij,...j->...", delta, torch.linalg.inv(cov_2d), delta)
    return g.intensities[0, 0] * bias * torch.exp(-0.5 * q)


def test_ewa_footprints_are_only_approximate_in_cone_beam():
    """The rasteriser approximation agrees with the exact per-ray integral for small Gaussians and
    drifts by O(sigma / distance to the source) for large ones; the exact form matches quadrature."""
    geo = ConeBeamGeometry(dso=1000.0, dsd=1500.0, det_shape=(96, 96), det_spacing=(4.0, 4.0),
                           vol_shape=(64, 64, 64), vol_spacing=(4.0, 4.0, 4.0), angles=[0.0])
    errors = {}
    for sigma in (2.0, 40.0):
        f64 = dict(dtype=torch.float64)
        scales = torch.tensor([[[sigma, sigma / 2, 1.5 * sigma]]], **f64)
        g = Gaussians(torch.tensor([[[0.0, 100.0, 50.0]]], **f64), scales,
                      torch.tensor([[[0.9, 0.3, -0.2, 0.1]]], **f64), torch.ones(1, 1, **f64))
        exact = project(g, geo, cutoff=None, backend="torch")[0, 0]
        errors[sigma] = ((ewa_footprint(g, geo) - exact).abs().max() / exact.max()).item()
    assert errors[2.0] < 3e-3  # same conventions, tiny linearisation error
    assert errors[40.0] > 1e-2  # a 40 mm Gaussian 1 m from the source: > 1 % of the peak off


def _wobbling_poses(views: int) -> torch.Tensor:
    """Per-view rigid poses: tilts about x and y and shifts (a wobbling gantry)."""
    poses = torch.eye(4, dtype=torch.float64).repeat(views, 1, 1)
    for i in range(views):
        rot = Rotation.from_rotvec([0.05 * (i + 1), -0.03 * i, 0.02]).as_matrix()
        poses[i, :3, :3] = torch.from_numpy(rot)
        poses[i, :3, 3] = torch.tensor([0.7 * i, -1.2, 2.5], dtype=torch.float64)
    return poses


@pytest.mark.parametrize("kind", GEOMETRIES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_detector_rays_built_from_vectors_match_geometry_rays(kind, dtype):
    geo = GEOMETRIES[kind](det=(6, 7), views=4, det_offset=(2.5, -3.0), vol_offset=(1.0, -2.0, 0.5),
                           poses=_wobbling_poses(4))
    for ids in (None, [3, 0], torch.tensor([2])):
        o, d = detector_rays(geo, ids, dtype=dtype)
        o_ref, d_ref = geo.rays(view_ids=ids, dtype=torch.float64)
        assert o.shape == d.shape == o_ref.shape and o.dtype == d.dtype == dtype
        tol = 1e-10 if dtype == torch.float64 else 1e-4  # mm, at ~650 mm from the isocentre
        torch.testing.assert_close(o.double(), o_ref, rtol=0, atol=tol)
        torch.testing.assert_close(d.double(), d_ref, rtol=0, atol=tol * 1e-2)
    # Only the [V, 12] vectors leave the host: the rays are computed on the requested device.
    o, d = detector_rays(geo, dtype=dtype, device="meta")
    assert o.device.type == d.device.type == "meta" and o.shape == (4, 6, 7, 3)


def test_project_needs_vectors_not_rays():
    """project() builds its rays from geometry.vectors() (on the Gaussians' device), not geometry.rays()."""
    geo = cone(det=(5, 6), views=2)

    class NoRays:
        def __getattr__(self, name):
            if name == "rays":
                raise AssertionError("project() must not build rays on the CPU")
            return getattr(geo, name)

    g = some_gaussians(b=1, n=2)
    torch.testing.assert_close(project(g, NoRays(), backend="torch"), project(g, geo, backend="torch"))
