"""The numba splat backend against independent references.

References: a float64 brute force written here (rotation from the quaternion, covariance, its
inverse by numpy, every voxel/point against every Gaussian), finite differences
(``torch.autograd.gradcheck``) and the pure-torch backend (forward and ``autograd.grad`` with
shared random cotangents, hypothesis-driven shapes and parameters).

A finite cutoff makes every term jump at ``q = cutoff^2``; two correct implementations may round
``q`` differently there, so comparisons leave out the (rare) voxels whose ``q`` lies within a
relative ``1e-9`` (float64) / ``1e-4`` (float32) of ``cutoff^2`` for some Gaussian, and give them a
zero cotangent in gradient comparisons.
"""

from __future__ import annotations

import math
import multiprocessing

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medgauss import _parallel
from medgauss.gaussians import Gaussians
from medgauss.render import _numba, splat
from medgauss.render import _numba_kernels as kernels
from medgauss.render._common import precision_factor

# ----------------------------------------------------------------------------------- references


def _rotation(q: np.ndarray) -> np.ndarray:
    """Rotation matrix of a (w, x, y, z) quaternion, normalised here."""
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def _voxel_centres(shape: tuple[int, int, int]) -> np.ndarray:
    axes = [(np.arange(n) + 0.5) / n for n in shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)


def brute_force(g: Gaussians, shape: tuple[int, int, int], cutoff: float | None,
                points: np.ndarray | None = None, rel_band: float = 1e-9) -> tuple[np.ndarray, np.ndarray]:
    """Float64 sum over every Gaussian at every voxel centre (or point): values and ambiguity mask.

    Returns ``values [B, X]`` and ``ambiguous [B, X]`` (bool: some Gaussian has ``q`` within
    ``rel_band * cutoff^2`` of ``cutoff^2``), with ``X = D*H*W`` or ``M``.
    """
    means = g.means.detach().double().numpy()
    scales = g.scales.detach().double().numpy()
    quats = g.quats.detach().double().numpy()
    inten = g.intensities.detach().double().numpy()
    b, n = means.shape[:2]
    x_all = np.broadcast_to(_voxel_centres(shape), (b, math.prod(shape), 3)) if points is None else points
    values = np.zeros(x_all.shape[:2])
    ambiguous = np.zeros(x_all.shape[:2], dtype=bool)
    for bi in range(b):
        for i in range(n):
            rot = _rotation(quats[bi, i])
            precision = np.linalg.inv(rot @ np.diag(scales[bi, i] ** 2) @ rot.T)
            r = x_all[bi] - means[bi, i]
            q = np.einsum("xi,ij,xj->x", r, precision, r)
            term = inten[bi, i] * np.exp(-0.5 * q)
            if cutoff is not None:
                term = np.where(q < cutoff**2, term, 0.0)
                ambiguous[bi] |= np.abs(q - cutoff**2) <= rel_band * cutoff**2
            values[bi] += term
    return values, ambiguous


def random_gaussians(rng: np.random.Generator, b: int, n: int, dtype: torch.dtype = torch.float64,
                     log_scale: tuple[float, float] = (math.log(0.01), math.log(1.5))) -> Gaussians:
    """Anisotropic rotated Gaussians, means in [-0.25, 1.25] (some partly outside), scales log-uniform."""
    means = rng.uniform(-0.25, 1.25, (b, n, 3))
    scales = np.exp(rng.uniform(*log_scale, (b, n, 3)))
    quats = rng.normal(size=(b, n, 4))
    inten = rng.normal(size=(b, n))
    return Gaussians(*(torch.tensor(a, dtype=dtype) for a in (means, scales, quats, inten)))


def mixed_gaussians(rng: np.random.Generator, b: int, dtype: torch.dtype = torch.float64) -> Gaussians:
    """Tiny (< a voxel), medium, needle-like and huge (> the volume) Gaussians, in every sample."""
    parts = [
        random_gaussians(rng, b, 3, dtype, (math.log(0.005), math.log(0.03))),  # tiny
        random_gaussians(rng, b, 4, dtype, (math.log(0.05), math.log(0.3))),  # medium
        random_gaussians(rng, b, 2, dtype, (math.log(0.02), math.log(0.8))),  # strongly anisotropic
        random_gaussians(rng, b, 2, dtype, (math.log(1.0), math.log(3.0))),  # huge
    ]
    return Gaussians.cat(parts, dim=1)


def _assert_close(actual: torch.Tensor | np.ndarray, expected: torch.Tensor | np.ndarray, rtol: float,
                  what: str, keep: np.ndarray | None = None) -> None:
    """``|actual - expected| <= rtol * max(1, max|expected|)`` (where ``keep``)."""
    a = np.asarray(torch.as_tensor(actual).detach().double().reshape(-1))
    e = np.asarray(torch.as_tensor(expected).detach().double().reshape(-1))
    if keep is not None:
        a, e = a[keep.reshape(-1)], e[keep.reshape(-1)]
    scale = max(1.0, float(np.abs(e).max(initial=0.0)))
    err = float(np.abs(a - e).max(initial=0.0))
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol:.1g} x {scale:.3g}"


# ----------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("cutoff", [None, 3.0, 1.7])
@pytest.mark.parametrize("shape", [(7, 10, 13), (12, 5, 9)])
def test_dense_matches_brute_force(cutoff, shape):
    g = mixed_gaussians(np.random.default_rng(0), b=2)
    out = splat(g, shape, cutoff=cutoff, backend="numba")
    assert out.shape == (2, 1, *shape) and out.dtype == torch.float64
    expected, ambiguous = brute_force(g, shape, cutoff)
    _assert_close(out.reshape(2, -1), expected, 1e-11, "dense float64", keep=~ambiguous)


@pytest.mark.parametrize("cutoff", [3.0, None])
@pytest.mark.parametrize("shape", [(9, 8, 11), (6, 5, 23)])  # rows shorter / longer than a vector block
def test_dense_float32_matches_brute_force(cutoff, shape):
    g = mixed_gaussians(np.random.default_rng(1), b=2, dtype=torch.float32)
    out = splat(g, shape, cutoff=cutoff, backend="numba")
    assert out.dtype == torch.float32
    expected, ambiguous = brute_force(g, shape, cutoff, rel_band=1e-4)
    _assert_close(out.reshape(2, -1), expected, 1e-5, "dense float32", keep=~ambiguous)


def test_dense_float32_covers_exactly_the_float64_pairs():
    """Float32 Gaussians: the same voxels inside as float64 (the inside test runs on float64 parameters)."""
    rng = np.random.default_rng(11)
    g64 = random_gaussians(rng, 1, 40, log_scale=(math.log(0.02), math.log(0.4)))
    g64 = Gaussians(g64.means, g64.scales, g64.quats, g64.intensities.abs() + 0.1)  # no cancellation
    for i in range(40):  # one Gaussian at a time: a voxel is non-zero exactly when it is inside
        one = g64[:, [i]]
        inside64 = splat(one, (13, 17, 19), cutoff=2.5, backend="numba") != 0
        inside32 = splat(one.to(torch.float32), (13, 17, 19), cutoff=2.5, backend="numba") != 0
        assert torch.equal(inside32, inside64), f"Gaussian {i}"


def _dense_routes(g: Gaussians, shape: tuple[int, int, int], cutoff: float) -> set[str]:
    """Which dense-forward routes (``recurrence`` / ``walk``) the kernel takes for ``g``'s sections."""
    c2 = cutoff * cutoff
    factor, prec = precision_factor(g)
    prep = _numba._prepare(g.means, prec, factor, g.intensities, shape)
    d_lo, d_hi = _numba._slab_ranges(prep, c2, shape[0])
    routes = set()
    for p, lo, hi in zip(prep.params, d_lo, d_hi):
        for d in range(lo, hi + 1):
            r0 = d - p[kernels.M0]
            q0 = p[kernels.SCHUR_D] * r0 * r0
            if not q0 < c2:
                continue
            h_first, h_last = kernels._padded_range(p[kernels.M1] + p[kernels.SLOPE1] * r0,
                                                    math.sqrt((c2 - q0) / p[kernels.SCHUR_H]), shape[1])
            if h_first <= h_last:
                cols = kernels._section_rectangle(p, r0, q0, h_first, h_last, c2, shape[2])[1]
                routes.add("recurrence" if cols > 0 else "walk")
    return routes


def test_dense_takes_both_routes_and_each_matches_brute_force():
    """Broad sections run the exp-free recurrence, thin sheared ones the row walk; both are exact."""
    rng = np.random.default_rng(21)
    broad = random_gaussians(rng, 1, 6, log_scale=(math.log(0.08), math.log(0.3)))
    needles = random_gaussians(rng, 1, 6, log_scale=(math.log(0.004), math.log(0.6)))
    shape = (11, 14, 17)
    assert _dense_routes(broad, shape, 3.0) == {"recurrence"}
    assert "walk" in _dense_routes(needles, shape, 3.0)
    for g in (broad, needles):
        expected, ambiguous = brute_force(g, shape, 3.0)
        _assert_close(splat(g, shape, cutoff=3.0, backend="numba").reshape(1, -1), expected, 1e-11,
                      "dense", keep=~ambiguous)
        _assert_grads_match_torch(g, shape, 3.0, rtol=1e-10)


def _assert_grads_match_torch(g: Gaussians, shape: tuple[int, int, int], cutoff: float, rtol: float) -> None:
    """Dense backward: gradients for a shared random cotangent equal the torch reference's autograd."""
    cotangent = torch.randn((g.batch_size, 1, *shape), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = {}
    for backend in ("numba", "torch"):
        leaves = _leaves(g)
        out = splat(Gaussians(*leaves), shape, cutoff=cutoff, backend=backend)
        grads[backend] = torch.autograd.grad((out * cotangent).sum(), leaves)
    for name, a, e in zip(("means", "scales", "quats", "intensities"), grads["numba"], grads["torch"]):
        _assert_close(a, e, rtol, f"grad {name}")


def test_dense_recurrence_stays_accurate_over_long_sections():
    """One wide, rotated Gaussian over ~60 x 70 voxel sections: hundreds of chained products per voxel."""
    g = Gaussians(torch.tensor([[[0.45, 0.52, 0.48]]], dtype=torch.float64),
                  torch.tensor([[[0.35, 0.2, 0.12]]], dtype=torch.float64),
                  torch.tensor([[[0.9, 0.3, -0.2, 0.25]]], dtype=torch.float64),
                  torch.tensor([[1.7]], dtype=torch.float64))
    shape = (12, 64, 72)
    assert _dense_routes(g, shape, 3.0) == {"recurrence"}
    expected, ambiguous = brute_force(g, shape, 3.0)
    out = splat(g, shape, cutoff=3.0, backend="numba").reshape(1, -1).numpy()
    keep = ~ambiguous
    assert np.abs(out - expected)[keep].max() <= 1e-12 * np.abs(expected).max()
    inside = keep & (expected != 0)  # relative error voxel by voxel, down to exp(-4.5) of the peak
    assert (np.abs(out - expected)[inside] / np.abs(expected[inside])).max() <= 1e-12
    _assert_grads_match_torch(g, shape, 3.0, rtol=1e-10)


def test_single_gaussian_analytic_values():
    """An axis-aligned Gaussian centred on a voxel: value exp(-k^2 / (2 s^2 n^2)) k voxels away, cut at 2."""
    shape = (5, 7, 9)
    sigma_vox = 1.3
    centre = torch.tensor([[[2.5 / 5, 3.5 / 7, 4.5 / 9]]], dtype=torch.float64)
    scales = torch.tensor([[[sigma_vox / 5, sigma_vox / 7, sigma_vox / 9]]], dtype=torch.float64)
    g = Gaussians(centre, scales, torch.tensor([[[1.0, 0, 0, 0]]], dtype=torch.float64),
                  torch.tensor([[2.0]], dtype=torch.float64))
    out = splat(g, shape, cutoff=2.0, backend="numba")[0, 0]
    idx = torch.stack(torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij"), -1)
    dist2 = ((idx - torch.tensor([2, 3, 4])) ** 2).sum(-1).double() / sigma_vox**2
    expected = torch.where(dist2 < 4.0, 2.0 * torch.exp(-0.5 * dist2), torch.zeros(()))
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-14)
    assert out[2, 3, 4] == pytest.approx(2.0) and out[0, 0, 0] == 0.0


def test_cutoff_none_equals_huge_cutoff_and_includes_far_tails():
    g = random_gaussians(np.random.default_rng(2), 1, 5, log_scale=(math.log(0.02), math.log(0.05)))
    full = splat(g, (6, 7, 8), cutoff=None, backend="numba")
    torch.testing.assert_close(full, splat(g, (6, 7, 8), cutoff=1e6, backend="numba"), rtol=0, atol=0)
    cut = splat(g, (6, 7, 8), cutoff=3.0, backend="numba")
    assert bool(((full - cut).abs() > 0).any())


def test_float_points_match_brute_force():
    rng = np.random.default_rng(3)
    g = mixed_gaussians(rng, b=2)
    pts = torch.tensor(rng.uniform(0, 1, (2, 57, 3)))
    assert _numba._voxel_centre_index(pts, (9, 8, 11)) is None  # cell-binned point kernels
    for cutoff in (None, 2.5):
        out = splat(g, (9, 8, 11), points=pts, cutoff=cutoff, backend="numba")
        assert out.shape == (2, 57) and out.dtype == torch.float64
        expected, ambiguous = brute_force(g, (9, 8, 11), cutoff, points=pts.numpy())
        _assert_close(out, expected, 1e-11, f"points cutoff={cutoff}", keep=~ambiguous)


@pytest.mark.parametrize("num_points", [23, 300])  # cell-binned kernels; dense render + gather
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_integer_points_equal_dense_gathered(num_points, dtype):
    rng = np.random.default_rng(4)
    shape = (8, 9, 7)
    g = mixed_gaussians(rng, b=2, dtype=dtype)
    idx = torch.stack([torch.tensor(rng.integers(0, s, (2, num_points))) for s in shape], -1)
    normalised = (idx.to(dtype) + 0.5) / torch.tensor(shape, dtype=dtype)
    gather_route = _numba._voxel_centre_index(normalised, shape) is not None
    assert gather_route == (num_points >= _numba.GATHER_MIN_FRACTION * math.prod(shape))
    dense = splat(g, shape, cutoff=3.0, backend="numba")[:, 0]
    at_points = splat(g, shape, points=idx, cutoff=3.0, backend="numba")
    assert at_points.dtype == dtype
    gathered = torch.stack([dense[b][tuple(idx[b].T)] for b in range(2)])
    rel_band = 1e-9 if dtype == torch.float64 else 1e-4
    _, ambiguous = brute_force(g, shape, 3.0, points=normalised.double().numpy(), rel_band=rel_band)
    _assert_close(at_points, gathered, 1e-12 if dtype == torch.float64 else 1e-5, "points vs dense",
                  keep=~ambiguous)


def test_empty_inputs_give_zeros_and_zero_gradients():
    g = random_gaussians(np.random.default_rng(5), 2, 0).requires_grad_()
    out = splat(g, (3, 4, 5), backend="numba")
    assert out.shape == (2, 1, 3, 4, 5) and not out.any()
    g = random_gaussians(np.random.default_rng(5), 2, 3).requires_grad_()
    out = splat(g, (3, 4, 5), points=torch.zeros(2, 0, 3, dtype=torch.float64), backend="numba")
    assert out.shape == (2, 0)
    grads = torch.autograd.grad(out.sum(), [g.means, g.intensities], allow_unused=True)
    assert all(gr is None or not gr.any() for gr in grads) and grads[1] is not None


def test_degenerate_factor_is_an_internal_error_not_nonsense():
    """precision_factor never makes a zero pivot; a factor that has one is refused, not rendered."""
    means = torch.full((1, 1, 3), 0.5, dtype=torch.float64)
    factor = torch.tensor([[[1.0, 0.0, 1.0, 0.5, 0.0, 0.0]]], dtype=torch.float64)  # L11 = 0: P singular
    prec = torch.tensor([[[1.25, 0.0, 1.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)
    with pytest.raises(ValueError, match="not positive definite"):
        _numba._prepare(means, prec, factor, torch.ones(1, 1, dtype=torch.float64), (4, 4, 4))


def _splat_in_child(g: Gaussians, connection) -> None:
    connection.send(splat(g, (6, 7, 8), backend="numba").numpy())  # plain array: no shared memory
    connection.close()


def test_works_in_a_forked_child_after_use_in_the_parent():
    """Data-loader workers fork: the child must not wait on the parent's (absent) pool threads."""
    g = random_gaussians(np.random.default_rng(8), 1, 4, log_scale=(math.log(0.1), math.log(0.3)))
    expected = splat(g, (6, 7, 8), backend="numba")  # creates the worker pool in this process
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_splat_in_child, args=(g, sender))
    child.start()
    try:
        assert receiver.poll(120), "the forked child did not answer"
        np.testing.assert_array_equal(receiver.recv(), expected.numpy())
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0


# ----------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("mode", ["dense", "float_points"])
def test_results_do_not_depend_on_the_number_of_threads(monkeypatch, mode):
    """Work split into 1 or many concurrent ranges (private buffers in the point backward) agrees."""
    rng = np.random.default_rng(7)
    g = mixed_gaussians(rng, b=2)
    points = None if mode == "dense" else torch.tensor(rng.uniform(0, 1, (2, 200, 3)))
    cotangent = None
    results = []
    for threads in (1, 5):
        monkeypatch.setattr(_parallel, "num_threads", lambda threads=threads: threads)
        leaves = _leaves(g)
        out = splat(Gaussians(*leaves), (9, 10, 11), points=points, cutoff=3.0, backend="numba")
        cotangent = torch.randn(out.shape, dtype=out.dtype) if cotangent is None else cotangent
        results.append((out, torch.autograd.grad((out * cotangent).sum(), leaves)))
    (out_1, grads_1), (out_5, grads_5) = results
    torch.testing.assert_close(out_5, out_1, rtol=0, atol=0)
    for a, e in zip(grads_5, grads_1):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def _leaves(g: Gaussians) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in (g.means, g.scales, g.quats, g.intensities)]


@pytest.mark.parametrize("mode", ["dense", "float_points", "voxel_points"])
def test_gradcheck_float64(mode):
    rng = np.random.default_rng(6)
    shape = (4, 5, 3)
    g = random_gaussians(rng, 2, 2, log_scale=(math.log(0.1), math.log(0.4)))
    points = {
        "dense": None,
        "float_points": torch.tensor(rng.uniform(0, 1, (2, 9, 3))),
        "voxel_points": torch.stack([torch.tensor(rng.integers(0, s, (2, 40))) for s in shape], -1),
    }[mode]

    def fn(means, scales, quats, inten):
        gaussians = Gaussians(means, scales, quats, inten)
        return splat(gaussians, shape, points=points, cutoff=None, backend="numba")

    assert torch.autograd.gradcheck(fn, _leaves(g), eps=1e-6, atol=1e-7, rtol=1e-5)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    b=st.integers(1, 2),
    n=st.integers(1, 6),
    shape=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9)),
    cutoff=st.sampled_from([None, 1.5, 3.0]),
    double=st.booleans(),
    mode=st.sampled_from(["dense", "float_points", "int_points"]),
)
def test_parity_with_torch_reference(seed, b, n, shape, cutoff, double, mode):
    """Forward and autograd.grad (shared random cotangent) equal the torch backend's."""
    rng = np.random.default_rng(seed)
    dtype = torch.float64 if double else torch.float32
    g = random_gaussians(rng, b, n, dtype, (math.log(0.03), math.log(0.6)))
    m = int(rng.integers(0, 40))
    points = {
        "dense": None,
        "float_points": torch.tensor(rng.uniform(0, 1, (b, m, 3)), dtype=dtype),
        "int_points": torch.stack([torch.tensor(rng.integers(0, s, (b, m))) for s in shape], -1),
    }[mode]
    if mode == "dense":
        x = None
    elif mode == "float_points":
        x = points.double().numpy()
    else:
        x = ((points.double() + 0.5) / torch.tensor(shape, dtype=torch.float64)).numpy()
    _, ambiguous = brute_force(g, shape, cutoff, points=x, rel_band=1e-9 if double else 1e-3)
    keep = torch.tensor(~ambiguous)
    out_shape = (b, 1, *shape) if points is None else (b, m)
    cotangent = torch.tensor(rng.normal(size=out_shape), dtype=dtype) * keep.reshape(out_shape).to(dtype)
    results = {}
    for backend in ("numba", "torch"):
        leaves = _leaves(g)
        out = splat(Gaussians(*leaves), shape, points=points, cutoff=cutoff, backend=backend)
        grads = torch.autograd.grad((out * cotangent).sum(), leaves, allow_unused=True)
        results[backend] = (out, [torch.zeros_like(t) if d is None else d for t, d in zip(leaves, grads)])
    rtol = 1e-10 if double else 2e-4
    (out_nb, grads_nb), (out_ref, grads_ref) = results["numba"], results["torch"]
    assert out_nb.shape == out_ref.shape and out_nb.dtype == out_ref.dtype == dtype
    _assert_close(out_nb, out_ref, rtol, "forward", keep=keep.numpy())
    for name, a, e in zip(("means", "scales", "quats", "intensities"), grads_nb, grads_ref):
        _assert_close(a, e, rtol, f"grad {name}")
