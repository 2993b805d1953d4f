"""project(): the culled numba and Triton backends against the dense torch reference, and culling itself.

The torch reference evaluates every (ray, Gaussian) pair with only the cutoff rule; numba and Triton
evaluate only pairs binned through the footprint boxes. Equal outputs and gradients (shared random
cotangents) therefore also show that culling never drops a contributing pair. The footprint boxes
are also checked directly against an independent per-pixel Mahalanobis distance (whitened frame).
Triton runs under TRITON_INTERPRET=1 (conftest), so its cases are tiny. The ``gpu`` class runs the
compiled Triton kernel on CUDA at larger sizes (``TRITON_INTERPRET=0 pytest -m gpu``), and a slow test
compiles every X-ray kernel variant for sm_90 (no GPU needed) and checks it spills no registers.
"""

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from medgauss.dispatch import resolve_backend
from medgauss.gaussians import Gaussians
from medgauss.geometry import ConeBeamGeometry, ParallelBeamGeometry
from medgauss.render.xray import footprint_pixel_rects, footprints, project

ANGLES = [0.3, 2.0]


def cone(det=(18, 21), spacing=(6.0, 5.0)):
    return ConeBeamGeometry(dso=400.0, dsd=650.0, det_shape=det, det_spacing=spacing, vol_shape=(8, 8, 8),
                            vol_spacing=(4.0, 4.0, 4.0), angles=ANGLES)


def parallel(det=(18, 21), spacing=(4.0, 3.5)):
    return ParallelBeamGeometry(det_shape=det, det_spacing=spacing, vol_shape=(8, 8, 8),
                                vol_spacing=(4.0, 4.0, 4.0), angles=ANGLES)


GEOMETRIES = {"cone": cone, "parallel": parallel}


def mixed_gaussians(b=2, dtype=torch.float64, seed=0) -> Gaussians:
    """Ordinary, sub-pixel, huge, partly off-detector, straddling the source plane of view 0 (its
    footprint is unbounded) and behind the source of view 0 (seen on the rays' backward extension)."""
    gen = torch.Generator().manual_seed(seed)
    n = 7
    means = (torch.rand(b, n, 3, generator=gen, dtype=torch.float64) - 0.5) * 40
    scales = torch.rand(b, n, 3, generator=gen, dtype=torch.float64) * 6 + 2
    quats = torch.randn(b, n, 4, generator=gen, dtype=torch.float64)
    inten = torch.rand(b, n, generator=gen, dtype=torch.float64) + 0.2
    source0 = 400.0 * torch.tensor([math.cos(ANGLES[0]), math.sin(ANGLES[0]), 0.0], dtype=torch.float64)
    scales[:, 1] = torch.tensor([0.3, 0.2, 0.4])  # smaller than a pixel
    scales[:, 2] = torch.tensor([40.0, 70.0, 30.0])  # larger than the field of view
    means[:, 3] = torch.tensor([5.0, -3.0, 55.0])  # near the detector's top edge
    means[:, 4], scales[:, 4] = 0.9 * source0, torch.tensor([30.0, 25.0, 20.0])
    means[:, 5], scales[:, 5] = 1.3 * source0, torch.tensor([5.0, 3.0, 6.0])
    return Gaussians(means, scales, quats, inten).to(dtype)


def forward_and_grads(g: Gaussians, geo, backend, cutoff, cotangent, view_ids=None):
    params = [t.detach().clone().requires_grad_(True) for t in (g.means, g.scales, g.quats, g.intensities)]
    out = project(Gaussians(*params, validate=False), geo, cutoff=cutoff, backend=backend, view_ids=view_ids)
    grads = torch.autograd.grad((out * cotangent).sum(), params)
    return out.detach(), grads


def assert_close_scaled(actual, expected, dtype):
    rel = 1e-10 if dtype == torch.float64 else 2e-4
    scale = expected.abs().max().item()
    np.testing.assert_allclose(actual.double().numpy(), expected.double().numpy(), rtol=rel, atol=rel * scale)


PARITY_CASES = [(b, k, d, c) for b in ("numba",) for k in GEOMETRIES for d in (torch.float64, torch.float32)
                for c in (3.0, None)]
# Triton's interpreter is slow: fewer cases, view 0 only (it holds the special Gaussians; several views
# are covered by test_view_subset_and_empty).
PARITY_CASES += [("triton", "cone", torch.float64, 3.0), ("triton", "cone", torch.float32, None),
                 ("triton", "parallel", torch.float32, 2.0)]


@pytest.mark.parametrize("backend, kind, dtype, cutoff", PARITY_CASES)
def test_forward_and_grad_parity_with_reference(backend, kind, dtype, cutoff):
    geo = GEOMETRIES[kind]()
    g = mixed_gaussians(dtype=dtype)
    view_ids = [0] if backend == "triton" else None
    views = 1 if view_ids else len(ANGLES)
    cot = torch.randn(2, views, 18, 21, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cot = cot.to(dtype)
    ref_out, ref_grads = forward_and_grads(g, geo, "torch", cutoff, cot, view_ids)
    out, grads = forward_and_grads(g, geo, backend, cutoff, cot, view_ids)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert ref_out.abs().max() > 1.0  # something is in view
    assert_close_scaled(out, ref_out, dtype)
    for name, got, want in zip(("means", "scales", "quats", "intensities"), grads, ref_grads):
        assert got.dtype == dtype, name
        assert want.abs().max() > 0, name
        assert_close_scaled(got, want, dtype)


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_view_subset_and_empty(backend):
    geo = cone()
    g = mixed_gaussians(b=1)
    full = project(g, geo, backend=backend)
    torch.testing.assert_close(project(g, geo, view_ids=[1], backend=backend), full[:, 1:])
    inten = torch.zeros(1, 0, dtype=torch.float64, requires_grad=True)
    empty = Gaussians(torch.zeros(1, 0, 3, dtype=torch.float64), torch.ones(1, 0, 3, dtype=torch.float64),
                      torch.ones(1, 0, 4, dtype=torch.float64), inten)
    out = project(empty, geo, backend=backend)
    assert out.shape == (1, 2, 18, 21) and not out.any()
    (grad,) = torch.autograd.grad(out.sum(), inten)
    assert grad.shape == (1, 0)


@pytest.mark.parametrize("kind", GEOMETRIES)
def test_gradcheck_numba(kind):
    geo = GEOMETRIES[kind](det=(3, 4), spacing=(16.0, 13.0))
    g0 = mixed_gaussians(b=1)[:, [0, 2]]

    def fn(means, scales, quats, inten):
        g = Gaussians(means, scales, quats, inten, validate=False)
        return project(g, geo, cutoff=None, view_ids=[0], backend="numba")

    inputs = [t.clone().requires_grad_(True) for t in (g0.means, g0.scales, g0.quats, g0.intensities)]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


def factors(g: Gaussians) -> np.ndarray:
    """``L [B, N, 3, 3]`` with ``Sigma = L L^T``, ``L = R diag(s)``, R from scipy (x, y, z, w order)."""
    quats = g.quats.detach().double().numpy()
    rot = Rotation.from_quat(quats.reshape(-1, 4)[:, [1, 2, 3, 0]]).as_matrix()
    return rot.reshape(*quats.shape[:2], 3, 3) * g.scales.detach().double().numpy()[..., None, :]


def min_mahalanobis_sq(g: Gaussians, geo) -> np.ndarray:
    """``[B, V, R, C, N]`` smallest squared Mahalanobis distance of each ray to each centre, via the
    whitened frame (``Sigma = L L^T``): the squared distance of the whitened line to the origin."""
    o, d = (t.numpy() for t in geo.rays(dtype=torch.float64))
    fac = factors(g)
    means = g.means.detach().double().numpy()
    out = np.zeros((*means.shape[:1], *o.shape[:3], means.shape[1]))
    for b in range(means.shape[0]):
        for i in range(means.shape[1]):
            inv = np.linalg.inv(fac[b, i])
            y0 = (o - means[b, i]) @ inv.T
            e = d @ inv.T
            e /= np.linalg.norm(e, axis=-1, keepdims=True)
            out[b, ..., i] = (np.cross(y0, e) ** 2).sum(-1)
    return out


@pytest.mark.parametrize("kind", GEOMETRIES)
def test_footprints_contain_every_contributing_pixel_and_are_tight(kind):
    geo = GEOMETRIES[kind](det=(48, 52), spacing=(2.2, 2.0))
    g = mixed_gaussians(seed=4)
    cutoff = 3.0
    inside = min_mahalanobis_sq(g, geo) < cutoff**2  # [B, V, R, C, N]
    rects = footprint_pixel_rects(g, geo.projection_matrices(), geo.det_shape, cutoff).numpy()
    rows = np.arange(48)[:, None, None]
    cols = np.arange(52)[None, :, None]
    in_rect = ((rows >= rects[:, :, None, None, :, 0]) & (rows <= rects[:, :, None, None, :, 1])
               & (cols >= rects[:, :, None, None, :, 2]) & (cols <= rects[:, :, None, None, :, 3]))
    assert inside.any()
    assert not (inside & ~in_rect).any(), "culling would drop a pair that passes the cutoff rule"
    # Tight: each box is the (clipped) bounding box of the projected ellipsoid surface, sampled densely
    # here, give or take a pixel; where the ellipsoid crosses the source plane the box is the detector.
    k = np.arange(4000) + 0.5
    polar, azimuth = np.arccos(1 - 2 * k / 4000), np.pi * (1 + 5**0.5) * k
    sphere = np.stack([np.sin(polar) * np.cos(azimuth), np.sin(polar) * np.sin(azimuth), np.cos(polar)], -1)
    surface = g.means.numpy()[..., None, :] + cutoff * np.einsum("bnij,kj->bnki", factors(g), sphere)
    hom = np.concatenate([surface, np.ones_like(surface[..., :1])], -1)
    pix = np.einsum("vij,bnkj->bvnki", geo.projection_matrices().numpy(), hom)  # [B, V, N, K, 3]
    straddling = 0
    for b, v, n in np.ndindex(*rects.shape[:3]):
        w = pix[b, v, n, :, 2]
        if w.min() < 0 < w.max():
            straddling += 1
            np.testing.assert_array_equal(rects[b, v, n], [0, 47, 0, 51])
            continue
        row, col = pix[b, v, n, :, 1] / w, pix[b, v, n, :, 0] / w
        expect = [np.ceil(row.min()), np.floor(row.max()), np.ceil(col.min()), np.floor(col.max())]
        expect = np.clip(expect, [0, -1, 0, -1], [48, 47, 52, 51])
        if expect[0] > expect[1] or expect[2] > expect[3]:
            assert rects[b, v, n, 0] > rects[b, v, n, 1] or rects[b, v, n, 2] > rects[b, v, n, 3]
        else:
            np.testing.assert_allclose(rects[b, v, n], expect, atol=1)
    assert straddling == (2 if kind == "cone" else 0)  # Gaussian 4 in view 0 of each sample
    # The outline conic: every contributing pixel is inside, and pixels inside are (nearly) contributing.
    _, conics = footprints(g, geo.projection_matrices(), geo.det_shape, cutoff)
    c = conics.numpy()[:, :, None, None, :, :]  # [B, V, 1, 1, N, 6]
    x, y = cols.astype(float), rows.astype(float)
    q = (c[..., 0] * x * x + 2 * c[..., 1] * x * y + 2 * c[..., 2] * x + c[..., 3] * y * y + 2 * c[..., 4] * y
         + c[..., 5])
    assert not (inside & (q < 0)).any(), "the outline conic would drop a pair that passes the cutoff rule"
    bounded = np.broadcast_to(c[..., 0] < 0, q.shape)  # unbounded outlines are "every pixel"
    assert (min_mahalanobis_sq(g, geo)[(q > 0) & bounded] < cutoff**2 * 1.001).all()
    # A Gaussian far outside the field of view gets an empty box in every view (culled everywhere).
    far = Gaussians(torch.tensor([[[10.0, -5.0, 400.0]]], dtype=torch.float64), g.scales[:1, :1],
                    g.quats[:1, :1], g.intensities[:1, :1])
    box = footprint_pixel_rects(far, geo.projection_matrices(), geo.det_shape, cutoff)
    assert ((box[..., 0] > box[..., 1]) | (box[..., 2] > box[..., 3])).all()


def test_auto_backend_on_cpu_is_numba(monkeypatch):
    monkeypatch.delenv("MEDGAUSS_BACKEND", raising=False)
    assert resolve_backend("project", "auto", torch.device("cpu")) == "numba"
    monkeypatch.setenv("MEDGAUSS_BACKEND", "torch")
    assert resolve_backend("project", "auto", torch.device("cpu")) == "torch"


# ------------------------------------------------------------------------------- real compilation
_COMPILE_XRAY_FOR_H100 = textwrap.dedent("""
    import itertools
    import torch
    from tests.render._sm90_cubin import sm90_resource_usage
    from triton_kernels import xray as X

    ints = ("V", "R", "C", "N", "num_tiles", "tiles_c")
    int_ptrs = ("tile_start_ptr", "ids_ptr")
    for dtype, backward, cutoff in itertools.product((torch.float32, torch.float64), (False, True), (False, True)):
        kernel = X._xray_bwd_kernel if backward else X._xray_fwd_kernel
        fp = "*fp32" if dtype == torch.float32 else "*fp64"
        consts = dict(TR=16, TC=16, BLOCK_G=X.default_block_g(dtype), HAS_CUTOFF=cutoff)
        line = sm90_resource_usage(kernel, ints=ints, int_ptrs=int_ptrs, fp=fp, consts=consts,
                                   num_warps=X.NUM_WARPS)
        print(dtype, kernel.__name__, cutoff, line)
        assert " STACK:0 " in line and " LOCAL:0 " in line, f"register spills: {line}"
""")


@pytest.mark.slow
def test_xray_kernels_compile_for_h100_without_spills():
    """Compiles every X-ray kernel variant to an sm_90 cubin (no GPU needed) and checks it spills nothing."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    run = subprocess.run([sys.executable, "-c", _COMPILE_XRAY_FOR_H100], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("REG:") == 8


# ---------------------------------------------------------------------------------------------- GPU
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def many_gaussians(b: int, n: int, dtype: torch.dtype, device: str, seed: int = 11) -> Gaussians:
    """The special Gaussians of :func:`mixed_gaussians` plus ``n`` random ones of 1-15 mm."""
    special = mixed_gaussians(b=b, dtype=torch.float64, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    extra = Gaussians((torch.rand(b, n, 3, generator=gen, dtype=torch.float64) - 0.5) * 60,
                      torch.rand(b, n, 3, generator=gen, dtype=torch.float64) * 14 + 1,
                      torch.randn(b, n, 4, generator=gen, dtype=torch.float64),
                      torch.rand(b, n, generator=gen, dtype=torch.float64) + 0.1)
    return Gaussians.cat([special, extra]).to(dtype=dtype, device=device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED,
                    reason="needs a CUDA device and compiled kernels (TRITON_INTERPRET=0)")
class TestTritonProjectOnCuda:
    """The compiled X-ray kernel against the torch reference on the same device, at realistic sizes."""

    @staticmethod
    def geometry(kind: str):
        common = dict(det_shape=(72, 90), det_spacing=(1.2, 1.1), vol_shape=(8, 8, 8), vol_spacing=(4.0, 4.0, 4.0),
                      angles=torch.linspace(0.3, 5.9, 6))
        if kind == "cone":
            return ConeBeamGeometry(dso=400.0, dsd=650.0, **common)
        return ParallelBeamGeometry(**common)

    def test_auto_selects_triton_on_cuda(self):
        assert resolve_backend("project", "auto", torch.device("cuda")) == "triton"

    @pytest.mark.parametrize("kind", GEOMETRIES)
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @pytest.mark.parametrize("cutoff", [3.0, None])
    def test_forward_and_gradients_match_torch_reference(self, kind, dtype, cutoff):
        geo = self.geometry(kind)
        g = many_gaussians(2, 120, dtype, "cuda")
        cot = torch.randn(2, 6, 72, 90, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        cot = cot.to(device="cuda", dtype=dtype)
        ref_out, ref_grads = forward_and_grads(g, geo, "torch", cutoff, cot)
        out, grads = forward_and_grads(g, geo, "triton", cutoff, cot)
        assert out.device.type == "cuda" and out.dtype == dtype and ref_out.abs().max() > 1.0
        if dtype == torch.float64:
            assert_close_scaled(out.cpu(), ref_out.cpu(), dtype)
        else:  # float32 may flip a pair sitting exactly on the cutoff: compare by norm
            assert ((out - ref_out).norm() / ref_out.norm()).item() < 1e-4
        for name, got, want in zip(("means", "scales", "quats", "intensities"), grads, ref_grads):
            assert want.abs().max() > 0, name
            if dtype == torch.float64:
                assert_close_scaled(got.cpu(), want.cpu(), dtype)
            else:  # float32: atomics sum in any order, and a pair exactly on the cutoff may flip
                assert ((got - want).norm() / want.norm()).item() < 1e-3, name

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_extreme_anisotropy_against_whitened_reference(self, dtype):
        from tests.render.test_render_contract import thin_gaussians_world, whitened_rays

        geo = self.geometry("cone")
        g = thin_gaussians_world(dtype)
        out = project(g.to("cuda"), geo, cutoff=3.0, backend="triton").cpu().double().numpy()
        want = whitened_rays(g, geo, 3.0)
        tol = 1e-9 if dtype == torch.float64 else 1e-4
        np.testing.assert_allclose(out, want, rtol=0, atol=tol * np.abs(want).max())

    def test_rays_are_built_on_the_device_and_empty_batches_work(self):
        from medgauss.render.xray import detector_rays

        geo = self.geometry("cone")
        o, d = detector_rays(geo, dtype=torch.float64, device="cuda")
        o_ref, d_ref = geo.rays(dtype=torch.float64)
        assert o.device.type == "cuda"
        torch.testing.assert_close(o.cpu(), o_ref, rtol=0, atol=1e-9)
        torch.testing.assert_close(d.cpu(), d_ref, rtol=0, atol=1e-12)
        leaves = [t.requires_grad_() for t in (torch.zeros(0, 3, 3, device="cuda"), torch.ones(0, 3, 3, device="cuda"),
                                               torch.ones(0, 3, 4, device="cuda"), torch.ones(0, 3, device="cuda"))]
        out = project(Gaussians(*leaves), geo, backend="triton")
        assert out.shape == (0, 6, 72, 90) and out.device.type == "cuda"
        assert all(g is not None for g in torch.autograd.grad(out.sum(), leaves))
