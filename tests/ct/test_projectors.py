"""Voxel projectors vs exact chord lengths, adjointness, backend agreement, gradients, validation."""

import math
import multiprocessing

import numpy as np
import pytest
import torch

from medgauss.ct import back_project, forward_project
from medgauss.geometry import ConeBeamGeometry, ParallelBeamGeometry
from tests.ct.phantoms import analytic_projection, voxelise

BACKENDS = ["numba", "torch"]


def phantom_geometry(kind: str):
    common = dict(
        det_shape=(20, 28),
        det_spacing=(2.5, 2.5),
        vol_shape=(48, 50, 52),
        vol_spacing=(1.0, 0.9, 1.0),
        angles=[0.1, 1.3, 2.9],
        vol_offset=(0.5, 0.0, -0.5),
    )
    if kind == "cone":
        return ConeBeamGeometry(dso=300.0, dsd=450.0, **common)
    return ParallelBeamGeometry(**common)


@pytest.fixture(scope="module")
def phantoms():
    out = {}
    for kind in ("cone", "parallel"):
        geo = phantom_geometry(kind)
        o, d = geo.rays(dtype=torch.float64)
        out[kind] = (geo, voxelise(geo), analytic_projection(o, d))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["cone", "parallel"])
def test_forward_matches_exact_chord_lengths(phantoms, kind, backend):
    geo, vol, exact = phantoms[kind]
    proj = forward_project(vol, geo, backend=backend)[0]
    err = (proj - exact).abs()
    peak = exact.abs().max()
    # Discretisation error of a 1 mm grid: small on average, bounded at ellipsoid edges.
    assert err.mean() < 0.005 * peak, float(err.mean() / peak)
    assert err.max() < 0.08 * peak, float(err.max() / peak)
    # Total "mass" per view agrees to < 1 %.
    torch.testing.assert_close(proj.sum(dim=(1, 2)), exact.sum(dim=(1, 2)), rtol=1e-2, atol=0.0)


def small_geometry(kind: str):
    common = dict(
        det_shape=(7, 9),
        det_spacing=(1.3, 1.1),
        vol_shape=(5, 6, 7),
        vol_spacing=(1.0, 1.2, 0.9),
        angles=[0.2, 1.9, 3.3, 5.0],
        det_offset=(0.4, -0.3),
        vol_offset=(0.3, -0.6, 0.2),
    )
    if kind == "cone":
        return ConeBeamGeometry(dso=40.0, dsd=70.0, **common)
    return ParallelBeamGeometry(**common)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["cone", "parallel"])
def test_adjointness_float32(kind, backend):
    geo = phantom_geometry(kind)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, *geo.vol_shape, generator=gen)
    y = torch.rand(2, *geo.output_shape(), generator=gen)
    lhs = (forward_project(x, geo, backend=backend).double() * y.double()).sum()
    rhs = (x.double() * back_project(y, geo, backend=backend).double()).sum()
    torch.testing.assert_close(lhs, rhs, rtol=2e-6, atol=0.0)


def tilted(geo):
    """Per-view poses: small tilts about x and shifts (a wobbling gantry)."""
    poses = torch.eye(4, dtype=torch.float64).repeat(geo.num_views, 1, 1)
    for i in range(geo.num_views):
        c, s = math.cos(0.1 * (i + 1)), math.sin(0.1 * (i + 1))
        poses[i, 1:3, 1:3] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
        poses[i, :3, 3] = torch.tensor([0.3 * i, -0.2, 0.4], dtype=torch.float64)
    return geo.replace(poses=poses)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["cone", "parallel", "cone-posed"])
def test_backends_agree(kind, dtype):
    geo = tilted(small_geometry("cone")) if kind == "cone-posed" else small_geometry(kind)
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 1, *geo.vol_shape, generator=gen, dtype=dtype)
    y = torch.rand(2, *geo.output_shape(), generator=gen, dtype=dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    fn, ft = forward_project(x, geo, backend="numba"), forward_project(x, geo, backend="torch")
    assert fn.dtype == ft.dtype == dtype and fn.shape == (2, 4, 7, 9)
    torch.testing.assert_close(fn, ft, **tol)
    bn, bt = back_project(y, geo, backend="numba"), back_project(y, geo, backend="torch")
    torch.testing.assert_close(bn, bt, **tol)
    assert fn.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_are_the_adjoint(backend):
    geo = small_geometry("cone").subset([0, 2]).replace(vol_shape=(3, 4, 4), det_shape=(4, 5))
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(1, 1, *geo.vol_shape, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.rand(1, *geo.output_shape(), generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: forward_project(v, geo, backend=backend), (x,))
    assert torch.autograd.gradcheck(lambda p: back_project(p, geo, backend=backend), (y,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["cone", "parallel"])
def test_empty_batch_gives_empty_outputs_with_gradients(kind, dtype, backend):
    """B = 0 is a valid batch: empty outputs of the right shape and dtype, and (empty) gradients."""
    geo = small_geometry(kind)
    x = torch.zeros(0, 1, *geo.vol_shape, dtype=dtype, requires_grad=True)
    y = torch.zeros(0, *geo.output_shape(), dtype=dtype, requires_grad=True)
    fp = forward_project(x, geo, backend=backend)
    bp = back_project(y, geo, backend=backend)
    assert fp.shape == (0, 4, 7, 9) and fp.dtype == dtype
    assert bp.shape == (0, 1, 5, 6, 7) and bp.dtype == dtype
    gx, gy = torch.autograd.grad(fp.sum() + bp.sum(), (x, y))
    assert gx.shape == x.shape and gy.shape == y.shape


def test_auto_backend_and_env_override(monkeypatch):
    geo = small_geometry("parallel")
    x = torch.rand(1, 1, *geo.vol_shape)
    monkeypatch.setenv("MEDGAUSS_BACKEND", "torch")
    a = forward_project(x, geo)
    monkeypatch.delenv("MEDGAUSS_BACKEND")
    torch.testing.assert_close(a, forward_project(x, geo), rtol=1e-5, atol=1e-5)


def test_validation_errors():
    geo = small_geometry("cone")
    with pytest.raises(ValueError, match=r"volume must have shape \[B, 1, 5, 6, 7\]"):
        forward_project(torch.zeros(1, 1, 5, 6, 8), geo)
    with pytest.raises(ValueError, match="float32 or float64"):
        forward_project(torch.zeros(1, 1, 5, 6, 7, dtype=torch.int32), geo)
    with pytest.raises(ValueError, match="geometry must be"):
        forward_project(torch.zeros(1, 1, 5, 6, 7), {"dso": 1})
    with pytest.raises(ValueError, match=r"projections must have shape \[B, 4, 7, 9\]"):
        back_project(torch.zeros(1, 3, 7, 9), geo)
    with pytest.raises(ValueError, match="backend"):
        forward_project(torch.zeros(1, 1, 5, 6, 7), geo, backend="cuda")


def _project_in_child(volume, projections, geometry, connection) -> None:
    fp = forward_project(volume, geometry, backend="numba")
    bp = back_project(projections, geometry, backend="numba")
    connection.send((fp.numpy(), bp.numpy()))  # plain arrays: no shared memory
    connection.close()


def test_numba_projectors_work_in_a_forked_child_after_use_in_the_parent():
    """Data-loader workers fork: the projectors must run in a child after running in the parent (see also
    tests/render/test_numba_threads.py, which does it through a DataLoader)."""
    geo = small_geometry("parallel")
    x = torch.rand(1, 1, *geo.vol_shape)
    y = torch.rand(1, *geo.output_shape())
    expected_fp = forward_project(x, geo, backend="numba")  # starts the thread pool in this process
    expected_bp = back_project(y, geo, backend="numba")
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_project_in_child, args=(x, y, geo, sender))
    child.start()
    try:
        assert receiver.poll(120), "the forked child did not answer"
        fp, bp = receiver.recv()
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    np.testing.assert_allclose(fp, expected_fp.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(bp, expected_bp.numpy(), rtol=1e-6, atol=1e-6)
