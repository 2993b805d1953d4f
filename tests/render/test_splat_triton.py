"""Triton backend of ``splat``: forward against a float64 brute force, gradients against the torch
reference and finite differences, the tile binning against a brute-force overlap check.

CPU tests run the kernels in Triton's interpreter (``TRITON_INTERPRET=1``, set by ``tests/conftest.py``)
at tiny sizes. The ``gpu`` class runs the same parity at larger sizes with compiled kernels on CUDA:
``TRITON_INTERPRET=0 pytest -m gpu tests/render/test_splat_triton.py``.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medgauss.gaussians import Gaussians
from medgauss.render import splat
from triton_kernels.binning import TileGrid, bin_gaussians, bin_points, tile_keys_of_points
from triton_kernels.splat import splat_tiles

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="CPU tensors need TRITON_INTERPRET=1 (tests/conftest.py sets it by default)")

SHAPE = (7, 9, 10)  # non-cubic, not a multiple of the (4, 8, 8) tile on any axis


# ------------------------------------------------------------------------------------------ helpers
def random_params(b: int, n: int, dtype: torch.dtype = torch.float64, seed: int = 0,
                  device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """Anisotropic rotated Gaussians of three size classes: tiny (below a voxel), medium, huge
    (larger than the volume); centres in [-0.25, 1.25]^3 so some lie partly outside the volume."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.rand(b, n, 3, generator=gen, dtype=torch.float64) * 1.5 - 0.25
    size_class = torch.arange(b * n).reshape(b, n, 1) % 3
    base = torch.tensor([0.02, 0.12, 1.0], dtype=torch.float64)[size_class]
    scales = base * (0.5 + torch.rand(b, n, 3, generator=gen, dtype=torch.float64))
    quats = torch.randn(b, n, 4, generator=gen, dtype=torch.float64)
    intensities = torch.randn(b, n, generator=gen, dtype=torch.float64)
    return tuple(t.to(dtype=dtype, device=device) for t in (means, scales, quats, intensities))


def brute_force(means, scales, quats, intensities, points, cutoff):
    """float64 numpy: value at ``points [B, M, 3]`` of every Gaussian, one Gaussian at a time."""
    means, scales, quats, intensities, points = (
        np.asarray(t.detach().cpu() if isinstance(t, torch.Tensor) else t, dtype=np.float64)
        for t in (means, scales, quats, intensities, points))
    out = np.zeros(points.shape[:2])
    for bi in range(means.shape[0]):
        for i in range(means.shape[1]):
            w, x, y, z = quats[bi, i] / np.linalg.norm(quats[bi, i])
            rot = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])
            cov = rot @ np.diag(scales[bi, i] ** 2) @ rot.T
            r = points[bi] - means[bi, i]
            q = np.einsum("mi,ij,mj->m", r, np.linalg.inv(cov), r)
            term = intensities[bi, i] * np.exp(-0.5 * q)
            if cutoff is not None:
                term = np.where(q < cutoff * cutoff, term, 0.0)
            out[bi] += term
    return out


def voxel_centres_np(shape):
    axes = [(np.arange(n) + 0.5) / n for n in shape]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)


def grads_of(params, shape, backend, cutoff, points, cotangent_seed=1):
    """``(output, d<out, cotangent>/d(means, scales, quats, intensities))`` through ``splat``."""
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    out = splat(Gaussians(*leaves), shape, points=points, cutoff=cutoff, backend=backend)
    gen = torch.Generator().manual_seed(cotangent_seed)
    cot = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
    return out.detach(), torch.autograd.grad(out, leaves, cot)


def assert_grads_close(got, want, rtol, norm=False):
    """Max error (or, with ``norm``, the Frobenius norm of the error) within ``rtol`` of the reference's."""
    for name, g, w in zip(("means", "scales", "quats", "intensities"), got, want):
        if norm:
            err, scale = (g - w).norm().item(), w.norm().item() + 1e-30
        else:
            err, scale = (g - w).abs().max().item(), w.abs().max().item() + 1e-30
        assert err <= rtol * scale, f"d/d{name}: error {err:.3g} vs scale {scale:.3g}"


# ------------------------------------------------------------------------------------------ forward
@needs_interpreter
@pytest.mark.parametrize("cutoff", [None, 3.0, 1.5])
def test_forward_matches_brute_force_float64(cutoff):
    params = random_params(2, 9, seed=1)
    got = splat(Gaussians(*params), SHAPE, cutoff=cutoff, backend="triton")
    assert got.shape == (2, 1, *SHAPE) and got.dtype == torch.float64
    want = brute_force(*params, np.broadcast_to(voxel_centres_np(SHAPE), (2, math.prod(SHAPE), 3)), cutoff)
    assert np.abs(want).max() > 0.1  # the Gaussians do reach the volume
    np.testing.assert_allclose(got.reshape(2, -1).numpy(), want, rtol=1e-10, atol=1e-12)


@needs_interpreter
def test_forward_float32_matches_brute_force():
    params = random_params(2, 6, dtype=torch.float32, seed=2)
    got = splat(Gaussians(*params), SHAPE, cutoff=3.0, backend="triton")
    assert got.dtype == torch.float32
    want = brute_force(*params, np.broadcast_to(voxel_centres_np(SHAPE), (2, math.prod(SHAPE), 3)), 3.0)
    np.testing.assert_allclose(got.reshape(2, -1).numpy(), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


@needs_interpreter
def test_forward_other_tilings_agree():
    """Tiles smaller than the volume in every axis and partial Gaussian blocks (N=5, block 2)."""
    from medgauss.render._common import half_extents, precision_factor

    g = Gaussians(*random_params(1, 5, seed=3))
    want = brute_force(g.means, g.scales, g.quats, g.intensities,
                       voxel_centres_np(SHAPE)[None], 3.0)
    for tile, block_g in (((2, 4, 4), 2), ((8, 16, 16), 8)):
        got = splat_tiles(g.means, precision_factor(g)[0], g.intensities, half_extents(g, 3.0), SHAPE,
                          cutoff=3.0, tile=tile, block_g=block_g)
        np.testing.assert_allclose(got.detach().numpy(), want, rtol=1e-10, atol=1e-12)


@needs_interpreter
@pytest.mark.parametrize("cutoff", [None, 2.0])
def test_points_mode(cutoff):
    params = random_params(2, 6, seed=4)
    g = Gaussians(*params)
    dense = splat(g, SHAPE, cutoff=cutoff, backend="triton")
    gen = torch.Generator().manual_seed(5)
    idx = torch.stack([torch.randint(0, n, (2, 40), generator=gen) for n in SHAPE], dim=-1)
    gathered = dense[torch.arange(2)[:, None], 0, idx[..., 0], idx[..., 1], idx[..., 2]]
    # integer voxel indices and the equivalent float voxel centres both equal the dense volume there
    sizes = torch.tensor(SHAPE, dtype=torch.float64)
    for pts in (idx, (idx.double() + 0.5) / sizes):
        got = splat(g, SHAPE, points=pts, cutoff=cutoff, backend="triton")
        assert got.shape == (2, 40)
        torch.testing.assert_close(got, gathered, rtol=1e-12, atol=1e-13)
    # arbitrary float points, including the faces 0 and 1 of the cube, against the brute force
    pts = torch.rand(2, 50, 3, generator=gen, dtype=torch.float64)
    pts[0, :6] = torch.tensor([[0.0, 0, 0], [1, 1, 1], [0, 1, 0.5], [1, 0, 0.999], [0.5, 0.5, 0.5],
                               [0, 0, 1]])
    got = splat(g, SHAPE, points=pts, cutoff=cutoff, backend="triton")
    np.testing.assert_allclose(got.numpy(), brute_force(*params, pts, cutoff), rtol=1e-10, atol=1e-12)


@needs_interpreter
def test_empty_inputs():
    params = random_params(2, 3, seed=6)
    empty = [p[:, :0].clone().requires_grad_(True) for p in params]
    out = splat(Gaussians(*empty), SHAPE, backend="triton")
    assert out.shape == (2, 1, *SHAPE) and not out.any()
    (grad_i,) = torch.autograd.grad(out.sum(), [empty[3]])
    assert grad_i.shape == (2, 0)
    no_points = torch.zeros(2, 0, 3, dtype=torch.float64)
    out = splat(Gaussians(*params), SHAPE, points=no_points, backend="triton")
    assert out.shape == (2, 0)
    out = splat(Gaussians(*empty), SHAPE, points=torch.rand(2, 4, 3, dtype=torch.float64), backend="triton")
    assert out.shape == (2, 4) and not out.any()


@needs_interpreter
def test_gaussians_outside_volume_contribute_nothing_and_get_zero_gradient():
    means = torch.tensor([[[1.6, 0.5, 0.5], [0.5, -0.9, 0.5]]], dtype=torch.float64, requires_grad=True)
    scales = torch.full((1, 2, 3), 0.05, dtype=torch.float64)
    quats = torch.tensor([[[1.0, 0, 0, 0]] * 2], dtype=torch.float64)
    inten = torch.ones(1, 2, dtype=torch.float64)
    out = splat(Gaussians(means, scales, quats, inten), SHAPE, cutoff=3.0, backend="triton")
    assert not out.any()
    (g,) = torch.autograd.grad(out.sum(), [means])
    assert not g.any()


@needs_interpreter
def test_bfloat16_gaussians_are_computed_in_float32_and_returned_in_their_dtype():
    params = random_params(1, 4, dtype=torch.float32, seed=14)
    leaves = [p.to(torch.bfloat16).requires_grad_(True) for p in params]
    out = splat(Gaussians(*leaves), SHAPE, backend="triton")
    assert out.dtype == torch.bfloat16
    want = splat(Gaussians(*(p.to(torch.bfloat16).float() for p in params)), SHAPE, backend="triton")
    # (the container normalises bfloat16 quats in bfloat16: agree to bfloat16 precision)
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
    grads = torch.autograd.grad(out.float().square().sum(), leaves)
    assert all(g.dtype == torch.bfloat16 and bool(g.isfinite().all()) and g.any() for g in grads)


# ---------------------------------------------------------------------------------------- gradients
@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["dense", "points"])
@pytest.mark.parametrize("cutoff", [None, 3.0])
def test_gradients_match_torch_reference(dtype, mode, cutoff):
    params = random_params(2, 6, dtype=dtype, seed=7)
    points = None
    if mode == "points":
        points = torch.rand(2, 30, 3, generator=torch.Generator().manual_seed(8)).to(dtype)
    out_t, got = grads_of(params, SHAPE, "triton", cutoff, points)
    out_r, want = grads_of(params, SHAPE, "torch", cutoff, points)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out_t, out_r, rtol=tol, atol=tol * out_r.abs().max().item())
    assert_grads_close(got, want, tol)


@needs_interpreter
@settings(max_examples=2, deadline=None, derandomize=True)
@given(shape=st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 9)),
       n=st.integers(1, 5), b=st.integers(1, 2), cutoff=st.sampled_from([None, 2.5, 4.0]),
       seed=st.integers(0, 2**16))
def test_gradients_match_torch_reference_hypothesis(shape, n, b, cutoff, seed):
    params = random_params(b, n, seed=seed)
    out_t, got = grads_of(params, shape, "triton", cutoff, None)
    out_r, want = grads_of(params, shape, "torch", cutoff, None)
    torch.testing.assert_close(out_t, out_r, rtol=1e-10, atol=1e-12)
    assert_grads_close(got, want, 1e-9)


@needs_interpreter
def test_kernel_gradcheck_float64():
    """Finite differences of the raw kernel w.r.t. means, packed precision factor and intensities."""
    from medgauss.render._common import half_extents, precision_factor

    g = Gaussians(*random_params(1, 2, seed=9))
    means = g.means.detach().clone().requires_grad_(True)
    prec = precision_factor(g)[0].detach().clone().requires_grad_(True)
    inten = g.intensities.detach().clone().requires_grad_(True)
    ext = half_extents(g, None)
    shape = (3, 4, 5)
    pts = torch.rand(1, 7, 3, generator=torch.Generator().manual_seed(10), dtype=torch.float64)

    def dense(m, p, i):
        return splat_tiles(m, p, i, ext, shape, cutoff=None)

    def sparse(m, p, i):
        return splat_tiles(m, p, i, ext, shape, points=pts, cutoff=None)

    assert torch.autograd.gradcheck(dense, (means, prec, inten), eps=1e-6, atol=1e-7, fast_mode=True)
    assert torch.autograd.gradcheck(sparse, (means, prec, inten), eps=1e-6, atol=1e-7, fast_mode=True)


# ------------------------------------------------------------------------------------------ binning
def _brute_force_pairs(means, scales, quats, points_per_batch, cutoff, grid):
    """Set of (tile key, flat Gaussian id) with q < cutoff^2 at some point of the tile (float64)."""
    b, n = means.shape[:2]
    pairs = set()
    keys = tile_keys_of_points(points_per_batch, grid)  # [B, M]
    for bi in range(b):
        for i in range(n):
            g = Gaussians(means[bi:bi + 1, i:i + 1], scales[bi:bi + 1, i:i + 1], quats[bi:bi + 1, i:i + 1],
                          torch.ones(1, 1, dtype=torch.float64))
            r = points_per_batch[bi] - means[bi, i]
            q = torch.einsum("mi,ij,mj->m", r, g.precision()[0, 0], r)
            pairs.update((int(k), bi * n + i) for k in keys[bi][q < cutoff * cutoff].unique())
    return pairs


def test_binning_lists_every_overlap_and_only_boxes_that_reach_the_tile():
    shape, tile, cutoff = (9, 13, 6), (2, 4, 4), 3.0
    grid = TileGrid(shape, tile)
    means, scales, quats, _ = random_params(2, 12, seed=11)
    scales = scales.clamp_max(0.3)  # keep some Gaussians away from some tiles
    g = Gaussians(means, scales, quats, torch.ones(2, 12, dtype=torch.float64))
    from medgauss.render._common import half_extents

    ext = half_extents(g, cutoff)
    tile_start, ids = bin_gaussians(means, ext, grid)
    assert tile_start.dtype == ids.dtype == torch.int32
    assert tile_start.shape == (2 * grid.num_tiles + 1,) and tile_start[-1] == ids.numel()
    listed = set()
    for key in range(2 * grid.num_tiles):
        seg = ids[tile_start[key]:tile_start[key + 1]].tolist()
        assert seg == sorted(set(seg)), "ids ascend within a tile, without duplicates"
        assert all(gid // 12 == key // grid.num_tiles for gid in seg), "Gaussians stay in their batch item"
        listed.update((key, gid) for gid in seg)
    # complete: every (tile, Gaussian) with a voxel centre or a random point inside the cutoff is listed
    gen = torch.Generator().manual_seed(12)
    pts = torch.cat([torch.from_numpy(voxel_centres_np(shape))[None].expand(2, -1, -1),
                     torch.rand(2, 3000, 3, generator=gen, dtype=torch.float64)], dim=1)
    needed = _brute_force_pairs(means, scales, quats, pts, cutoff, grid)
    assert needed, "the check must cover some overlaps"
    assert needed <= listed, f"missing pairs: {sorted(needed - listed)[:5]}"
    # sound: every listed pair's tile region meets the Gaussian's box mu +- ext (up to a hair of slack)
    ntd, nth, ntw = grid.tiles_per_axis
    for key, gid in listed:
        t = key % grid.num_tiles
        tidx = (t // (nth * ntw), (t // ntw) % nth, t % ntw)
        bi, i = divmod(gid, 12)
        for a in range(3):
            lo = tidx[a] * tile[a] / shape[a]
            hi = min((tidx[a] + 1) * tile[a], shape[a]) / shape[a]
            mu, e = means[bi, i, a].item(), ext[bi, i, a].item()
            assert mu + e >= lo - 1e-3 / shape[a] and mu - e <= hi + 1e-3 / shape[a]


def test_binning_empty_and_fully_outside():
    grid = TileGrid((5, 5, 5), (4, 4, 4))
    means = torch.tensor([[[2.0, 0.5, 0.5], [0.5, 0.5, -1.0]]], dtype=torch.float64)
    tile_start, ids = bin_gaussians(means, torch.full_like(means, 0.1), grid)
    assert ids.numel() == 0 and not tile_start.any()


def test_bin_points_covers_every_point_once():
    grid = TileGrid((7, 9, 10), (2, 4, 4))
    gen = torch.Generator().manual_seed(13)
    pts = torch.rand(2, 500, 3, generator=gen, dtype=torch.float64)
    pts[1, :100] = 0.3  # 100 points in one tile: several work items for it
    pts[0, 0] = 1.0
    order, pts_sorted, item_tile, item_start, item_count = bin_points(pts, grid, block=32)
    assert sorted(order.tolist()) == list(range(1000))
    torch.testing.assert_close(pts_sorted, pts.reshape(-1, 3)[order])
    keys = tile_keys_of_points(pts, grid).reshape(-1)[order]
    assert bool((item_count > 0).all()) and bool((item_count <= 32).all())
    covered = torch.zeros(1000, dtype=torch.int64)
    for t, s, c in zip(item_tile.tolist(), item_start.tolist(), item_count.tolist()):
        covered[s:s + c] += 1
        assert bool((keys[s:s + c] == t).all()), "a work item holds points of its own tile only"
    assert bool((covered == 1).all())


# --------------------------------------------------------------------------------------- validation
@needs_interpreter
def test_kernel_rejects_bad_arguments():
    means, prec, inten = torch.zeros(1, 2, 3), torch.zeros(1, 2, 6), torch.zeros(1, 2)
    ext = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="factor must have shape"):
        splat_tiles(means, prec[:, :1], inten, ext, (4, 4, 4))
    with pytest.raises(ValueError, match="intensities has dtype"):
        splat_tiles(means, prec, inten.double(), ext, (4, 4, 4))
    with pytest.raises(ValueError, match="float32 or float64"):
        splat_tiles(means.half(), prec.half(), inten.half(), ext, (4, 4, 4))
    with pytest.raises(ValueError, match="tile must be three powers of two"):
        splat_tiles(means, prec, inten, ext, (4, 4, 4), tile=(3, 4, 4))
    with pytest.raises(ValueError, match="points must have shape"):
        splat_tiles(means, prec, inten, ext, (4, 4, 4), points=torch.zeros(2, 5, 3))
    with pytest.raises(ValueError, match="shape must be"):
        splat_tiles(means, prec, inten, ext, (4, 0, 4))


# ------------------------------------------------------------------------------- real compilation
_COMPILE_FOR_H100 = textwrap.dedent("""
    import itertools
    import torch
    from tests.render._sm90_cubin import sm90_resource_usage
    from triton_kernels import splat as S

    ints = ("N", "D", "H", "W", "tiles_h", "tiles_w", "num_tiles", "v_total")
    int_ptrs = ("tile_start_ptr", "gauss_ids_ptr", "item_tile_ptr", "item_start_ptr", "item_count_ptr")
    tile = S.DEFAULT_TILE
    for dtype, backward, points, listed in itertools.product(
            (torch.float32, torch.float64), (False, True), (False, True), (False, True)):
        kernel = S._splat_bwd_kernel if backward else S._splat_fwd_kernel
        fp = "*fp32" if dtype == torch.float32 else "*fp64"
        consts = dict(TD=tile[0], TH=tile[1], TW=tile[2], BLOCK_G=S.DEFAULT_BLOCK_G, POINTS=points,
                      USE_LIST=listed, HAS_CUTOFF=listed)
        line = sm90_resource_usage(kernel, ints=ints, int_ptrs=int_ptrs, fp=fp, consts=consts,
                                   num_warps=S.num_warps_for(backward, dtype))
        print(dtype, kernel.__name__, points, listed, line)
        assert " STACK:0 " in line and " LOCAL:0 " in line, f"register spills: {line}"
""")


@pytest.mark.slow
def test_kernels_compile_for_h100_without_spills():
    """Compiles every kernel variant to an sm_90 cubin (no GPU needed) and checks it spills nothing."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    run = subprocess.run([sys.executable, "-c", _COMPILE_FOR_H100], env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("REG:") == 16


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRETED,
                    reason="needs a CUDA device and compiled kernels (TRITON_INTERPRET=0)")
class TestTritonOnCuda:
    shape = (33, 40, 47)

    def test_auto_selects_triton_on_cuda(self):
        from medgauss.render import resolve_backend

        assert resolve_backend("splat", "auto", torch.device("cuda")) == "triton"

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @pytest.mark.parametrize("cutoff", [None, 3.0])
    def test_forward_matches_brute_force(self, dtype, cutoff):
        params = random_params(2, 60, dtype=dtype, seed=21, device="cuda")
        got = splat(Gaussians(*params), self.shape, cutoff=cutoff, backend="triton")
        centres = np.broadcast_to(voxel_centres_np(self.shape), (2, math.prod(self.shape), 3))
        want = brute_force(*params, centres, cutoff)
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        err = np.abs(got.reshape(2, -1).cpu().numpy() - want)
        # float32 can flip a pair sitting exactly on the cutoff surface: allow a handful of such voxels
        bad = err > tol * (1 + np.abs(want).max())
        assert bad.sum() <= (0 if dtype == torch.float64 else 5), f"{bad.sum()} voxels differ"

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    @pytest.mark.parametrize("mode", ["dense", "points"])
    @pytest.mark.parametrize("cutoff", [None, 3.0])
    def test_gradients_match_torch_reference(self, dtype, mode, cutoff):
        params = random_params(2, 200, dtype=dtype, seed=22, device="cuda")
        points = None
        if mode == "points":
            points = torch.rand(2, 5000, 3, generator=torch.Generator().manual_seed(23)).to("cuda", dtype)
        out_t, got = grads_of(params, self.shape, "triton", cutoff, points)
        out_r, want = grads_of(params, self.shape, "torch", cutoff, points)
        # float32: the two backends may disagree on a pair sitting exactly on the cutoff surface
        # (rounding of q), so compare by norm there
        if dtype == torch.float64:
            torch.testing.assert_close(out_t, out_r, rtol=1e-9, atol=1e-9 * out_r.abs().max().item())
            assert_grads_close(got, want, 1e-8)
        else:
            assert ((out_t - out_r).norm() / out_r.norm()).item() < 1e-4
            assert_grads_close(got, want, 1e-3, norm=True)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_extreme_anisotropy_against_whitened_reference(self, dtype):
        from tests.render.test_render_contract import (
            points_near_the_gaussians,
            thin_gaussians_normalised,
            whitened_points,
        )

        g = thin_gaussians_normalised(dtype)
        points = points_near_the_gaussians(g)
        got = splat(g.to("cuda"), self.shape, points=points.to("cuda"), cutoff=None, backend="triton")
        want = whitened_points(g, points.double().numpy(), None)
        tol = 1e-9 if dtype == torch.float64 else 3e-3
        np.testing.assert_allclose(got.cpu().double().numpy(), want, rtol=0, atol=tol * np.abs(want).max())

    def test_empty_batch_on_cuda(self):
        leaves = [t.requires_grad_() for t in (torch.zeros(0, 4, 3, device="cuda"), torch.ones(0, 4, 3, device="cuda"),
                                               torch.ones(0, 4, 4, device="cuda"), torch.ones(0, 4, device="cuda"))]
        out = splat(Gaussians(*leaves), self.shape, backend="triton")
        assert out.shape == (0, 1, *self.shape) and out.device.type == "cuda"
        assert all(g is not None for g in torch.autograd.grad(out.sum(), leaves))
