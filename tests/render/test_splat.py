"""splat(): every backend against an independent float64 brute force, points mode, gradients, bad input.

The brute force builds covariances with scipy's rotations and loops over Gaussians in numpy, so it
shares no code with medgauss. Triton runs under TRITON_INTERPRET=1 (set in conftest), so sizes are small.
"""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from medgauss.gaussians import Gaussians
from medgauss.render import BACKENDS, available_backends, resolve_backend, splat

ALL = list(BACKENDS)


def brute_force(g: Gaussians, shape, cutoff, points=None) -> np.ndarray:
    """float64 sum over every (Gaussian, point); points are normalised [B,M,3] or None (voxel centres)."""
    means = g.means.detach().double().numpy()
    scales = g.scales.detach().double().numpy()
    quats = g.quats.detach().double().numpy()
    inten = g.intensities.detach().double().numpy()
    if points is None:
        axes = [(np.arange(n) + 0.5) / n for n in shape]
        pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        pts = np.broadcast_to(pts, (means.shape[0], *pts.shape))
    else:
        pts = points.double().numpy()
    out = np.zeros(pts.shape[:2])
    for b in range(means.shape[0]):
        rot = Rotation.from_quat(quats[b][:, [1, 2, 3, 0]]).as_matrix()
        for i in range(means.shape[1]):
            cov = rot[i] @ np.diag(scales[b, i] ** 2) @ rot[i].T
            r = pts[b] - means[b, i]
            q = np.einsum("mi,ij,mj->m", r, np.linalg.inv(cov), r)
            term = inten[b, i] * np.exp(-0.5 * q)
            if cutoff is not None:
                term = np.where(q < cutoff**2, term, 0.0)
            out[b] += term
    return out if points is not None else out.reshape(means.shape[0], 1, *shape)


def mixed_gaussians(b=2, dtype=torch.float64, seed=0) -> Gaussians:
    """Anisotropic rotated Gaussians: ordinary, tiny (< 1 voxel), huge (> volume), partly outside."""
    gen = torch.Generator().manual_seed(seed)
    n = 10
    means = torch.rand(b, n, 3, generator=gen, dtype=torch.float64) * 1.2 - 0.1
    scales = torch.rand(b, n, 3, generator=gen, dtype=torch.float64) * 0.15 + 0.03
    scales[:, 0] = torch.tensor([0.02, 0.05, 0.01])  # tiny along some axes
    scales[:, 1] = torch.tensor([1.5, 2.0, 0.8])  # larger than the volume
    means[:, 2] = torch.tensor([1.05, -0.05, 0.5])  # centre outside, tails inside
    quats = torch.randn(b, n, 4, generator=gen, dtype=torch.float64)
    inten = torch.rand(b, n, generator=gen, dtype=torch.float64) + 0.2
    return Gaussians(means, scales, quats, inten).to(dtype)


def tol(dtype):
    return dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("cutoff", [None, 3.0, 1.5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dense_matches_brute_force(backend, cutoff, dtype):
    g = mixed_gaussians(dtype=dtype)
    shape = (5, 7, 9)
    out = splat(g, shape, cutoff=cutoff, backend=backend)
    assert out.shape == (2, 1, *shape) and out.dtype == dtype
    np.testing.assert_allclose(out.double().numpy(), brute_force(g, shape, cutoff), **tol(dtype))


@pytest.mark.parametrize("backend", ALL)
def test_points_mode_equals_dense_gathered(backend):
    g = mixed_gaussians(dtype=torch.float32)
    shape = (6, 5, 8)
    dense = splat(g, shape, cutoff=3.0, backend=backend)
    gen = torch.Generator().manual_seed(3)
    idx = torch.stack([torch.randint(0, n, (2, 40), generator=gen) for n in shape], dim=-1)
    vals = splat(g, shape, points=idx, cutoff=3.0, backend=backend)
    gathered = torch.stack([dense[b, 0, idx[b, :, 0], idx[b, :, 1], idx[b, :, 2]] for b in range(2)])
    torch.testing.assert_close(vals, gathered, rtol=2e-5, atol=2e-5)
    # Off-grid float points against the brute force.
    pts = torch.rand(2, 33, 3, generator=gen)
    vals = splat(g, shape, points=pts, cutoff=3.0, backend=backend)
    np.testing.assert_allclose(vals.double().numpy(), brute_force(g, shape, 3.0, points=pts), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", [b for b in ALL if b != "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("use_points", [False, True])
def test_gradients_match_the_torch_reference(backend, dtype, use_points):
    g = mixed_gaussians(dtype=dtype, seed=4)
    shape = (5, 6, 7)
    points = torch.rand(2, 50, 3, dtype=dtype, generator=torch.Generator().manual_seed(5)) if use_points else None
    leaves = [t.detach().clone().requires_grad_() for t in (g.means, g.scales, g.quats, g.intensities)]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    cot_shape = (2, 50) if use_points else (2, 1, *shape)
    cot = torch.randn(cot_shape, dtype=dtype, generator=torch.Generator().manual_seed(6))

    def grads(ts, name):
        out = splat(Gaussians(*ts), shape, points=points, cutoff=3.0, backend=name)
        return torch.autograd.grad(out, ts, cot)

    for got, want in zip(grads(leaves, backend), grads(ref_leaves, "torch")):
        scale = want.abs().max().clamp_min(1e-6)
        assert torch.allclose(got, want, rtol=1e-4 if dtype == torch.float32 else 1e-8, atol=1e-5 * scale)


def test_torch_reference_gradcheck_float64():
    g = mixed_gaussians(b=1, seed=7)[:, :4]
    pts = torch.rand(1, 12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8))

    def f(means, scales, quats, inten):
        return splat(Gaussians(means, scales, quats, inten), (4, 5, 3), points=pts, cutoff=None, backend="torch")

    args = [t.detach().clone().requires_grad_() for t in (g.means, g.scales, g.quats, g.intensities)]
    assert torch.autograd.gradcheck(f, args)


@pytest.mark.parametrize("backend", ALL)
def test_empty_gaussians_and_points(backend):
    g = Gaussians(torch.zeros(2, 0, 3), torch.ones(2, 0, 3), torch.ones(2, 0, 4), torch.zeros(2, 0))
    assert torch.equal(splat(g, (3, 4, 5), backend=backend), torch.zeros(2, 1, 3, 4, 5))
    g1 = mixed_gaussians(dtype=torch.float32)
    assert splat(g1, (3, 4, 5), points=torch.zeros(2, 0, 3), backend=backend).shape == (2, 0)


def test_reference_memory_is_chunked():
    """512 Gaussians into 40^3: an unchunked reference would hold 33M-pair tensors (over 1 GB); it must stay small.

    Runs in a fresh interpreter because ru_maxrss is a process-wide peak, with glibc's mmap threshold
    fixed: its dynamic threshold otherwise keeps freed block scratch in the heap, and peak RSS then
    measures allocator fragmentation rather than what the reference holds.
    """
    import subprocess
    import sys

    code = (
        "import resource, torch\n"
        "from medgauss.gaussians import Gaussians\n"
        "from medgauss.render import splat\n"
        "g = Gaussians(torch.rand(1, 512, 3), torch.full((1, 512, 3), 0.1), torch.randn(1, 512, 4),\n"
        "              torch.ones(1, 512))\n"
        "splat(g, (8, 8, 8), backend='torch')\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "g = Gaussians(*(t.requires_grad_() for t in (g.means, g.scales, g.quats, g.intensities)))\n"
        "splat(g, (40, 40, 40), backend='torch').sum().backward()\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "MALLOC_MMAP_THRESHOLD_": "1048576"},
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    assert res.returncode == 0, res.stderr
    grown_mib = float(res.stdout.strip().splitlines()[-1])
    assert grown_mib < 250, f"torch reference forward+backward grew peak RSS by {grown_mib:.0f} MiB"


# ----------------------------------------------------------------------------- bad input
def good():
    return mixed_gaussians(dtype=torch.float32)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(shape=()), "shape"),
        (dict(shape=(4, 4)), "shape"),
        (dict(shape=(4, 0, 4)), "shape"),
        (dict(shape=(4, 4.5, 4)), "shape"),
        (dict(cutoff=-1.0), "cutoff"),
        (dict(cutoff=float("nan")), "cutoff"),
        (dict(points=torch.rand(3, 5, 3)), "points must have shape"),
        (dict(points=torch.rand(2, 5)), "points must have shape"),
        (dict(points=torch.rand(2, 5, 3) + 1.0), "must lie in \\[0, 1\\]"),
        (dict(points=torch.full((2, 5, 3), float("nan"))), "non-finite"),
        (dict(points=torch.full((2, 5, 3), 4, dtype=torch.long)), "voxel indices"),
        (dict(points=torch.full((2, 5, 3), -1, dtype=torch.long)), "voxel indices"),
        (dict(points=torch.zeros(2, 5, 3, dtype=torch.bool)), "float \\(normalised\\) or integer"),
        (dict(points=torch.tensor([[[0.5, float("inf"), 0.5]]]).expand(2, 1, 3)), "non-finite"),
        (dict(points=torch.tensor([[[0, 4, 0]]]).expand(2, 1, 3)), "voxel indices"),
        (dict(backend="cuda"), "backend must be"),
    ],
)
def test_bad_input(kwargs, match):
    args = dict(shape=(4, 4, 4))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        splat(good(), **args)


def test_not_a_gaussians_container():
    with pytest.raises(ValueError, match="gaussians must be"):
        splat(torch.zeros(1, 3, 3), (4, 4, 4))


# ----------------------------------------------------------------------------- dispatch
def test_dispatch_order_argument_env_auto(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("MEDGAUSS_BACKEND", raising=False)
    assert resolve_backend("splat", "auto", cpu) == "numba"
    monkeypatch.setenv("MEDGAUSS_BACKEND", "torch")
    assert resolve_backend("splat", "auto", cpu) == "torch"
    assert resolve_backend("splat", "numba", cpu) == "numba"  # the argument wins over the variable
    monkeypatch.setenv("MEDGAUSS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MEDGAUSS_BACKEND"):
        resolve_backend("splat", "auto", cpu)


def test_explicit_backend_that_cannot_run_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="triton.*CUDA"):
        resolve_backend("splat", "triton", torch.device("cpu"))
    monkeypatch.setenv("MEDGAUSS_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="environment variable"):
        resolve_backend("splat", "auto", torch.device("cpu"))
    assert "triton" not in available_backends("splat", "cpu")
