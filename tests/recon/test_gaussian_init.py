"""Non-learned 3DGR initialisers (medgauss.recon.gaussian.init) against float64 brute forces.

World positions are checked against the voxel-centre formula of the geometry's docstring
(``x = (w - (W-1)/2) sw + off_w`` etc.), written out here in NumPy, not through ``volume_affine``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medgauss.gaussians import Gaussians, gaussians_to_normalized
from medgauss.geometry import ConeBeamGeometry
from medgauss.recon.gaussian.init import (
    DEFAULT_RANDOM_INTENSITY,
    check_volume_on_geometry,
    init_from_fbp,
    init_from_volume_fit,
    init_random,
)
from medgauss.render import splat


def _geometry(shape=(16, 16, 16), spacing=(1.0, 1.0, 1.0), offset=(0.0, 0.0, 0.0)) -> ConeBeamGeometry:
    return ConeBeamGeometry(dso=1000.0, dsd=1500.0, det_shape=(32, 32), det_spacing=(2.0, 2.0), vol_shape=shape,
                            vol_spacing=spacing, angles=torch.linspace(0.0, math.pi, 8), vol_offset=offset)


def _world(geo: ConeBeamGeometry, index) -> np.ndarray:
    """``[..., 3]`` float64 world (x, y, z) mm of continuous voxel indices ``[..., 3]`` (d, h, w)."""
    idx = np.asarray(index, dtype=np.float64)
    out = np.empty(idx.shape)
    for world_axis, array_axis in ((0, 2), (1, 1), (2, 0)):  # x <- w, y <- h, z <- d
        n, s, o = geo.vol_shape[array_axis], geo.vol_spacing[array_axis], geo.vol_offset[array_axis]
        out[..., world_axis] = (idx[..., array_axis] - (n - 1) / 2.0) * s + o
    return out


def _index(geo: ConeBeamGeometry, world: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_world`: ``[..., 3]`` continuous (d, h, w) indices of world points."""
    world = np.asarray(world, dtype=np.float64)
    out = np.empty(world.shape)
    for world_axis, array_axis in ((0, 2), (1, 1), (2, 0)):
        n, s, o = geo.vol_shape[array_axis], geo.vol_spacing[array_axis], geo.vol_offset[array_axis]
        out[..., array_axis] = (world[..., world_axis] - o) / s + (n - 1) / 2.0
    return out


def _render(g: Gaussians, geo: ConeBeamGeometry) -> torch.Tensor:
    shape = geo.vol_shape
    return splat(gaussians_to_normalized(g, shape, affine=geo.volume_affine), shape)


def _optimal_factor(g: Gaussians, volume: torch.Tensor, geo: ConeBeamGeometry) -> float:
    """The factor that would best rescale ``g``'s intensities (1 for a least-squares-fitted g)."""
    r, v = _render(g, geo).double(), volume.double()
    return float((r * v).sum() / (r * r).sum())


def _psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    mse = float((pred.double() - target.double()).square().mean())
    return 10.0 * math.log10(float(target.abs().max()) ** 2 / mse)


def _assert_identity_rotations(g: Gaussians) -> None:
    expected = torch.zeros_like(g.quats)
    expected[..., 0] = 1.0
    assert torch.equal(g.quats, expected)
    assert g.linear_map is None


# ---------------------------------------------------------------------------------------------- checks
def test_check_volume_on_geometry_returns_volume_and_rejects_bad_input():
    geo = _geometry((4, 5, 6))
    vol = torch.rand(1, 1, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    out = check_volume_on_geometry(vol, geo)
    assert torch.equal(out, vol) and not out.requires_grad and out.dtype == torch.float64
    bad = [
        (torch.zeros(1, 1, 4, 5, 7), "shape"),
        (torch.zeros(4, 5, 6), "shape"),
        (torch.zeros(1, 1, 4, 5, 6, dtype=torch.float16), "float32 or float64"),
        (torch.zeros(1, 1, 4, 5, 6, dtype=torch.int32), "float32 or float64"),
        (torch.full((1, 1, 4, 5, 6), float("nan")), "non-finite"),
        (torch.full((1, 1, 4, 5, 6), float("inf")), "non-finite"),
        (np.zeros((1, 1, 4, 5, 6)), "torch.Tensor"),
    ]
    for value, why in bad:
        with pytest.raises(ValueError, match=f"prior.*{why}"):
            check_volume_on_geometry(value, geo, name="prior")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="geometry"):
        check_volume_on_geometry(vol, "geometry")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- 3dgr
def test_3dgr_world_frame_plateau_with_bright_block():
    """Odd grid, anisotropic voxels, offset volume: every centre is a half-resolution voxel centroid in world
    mm, the brightest Gaussian sits on the bright block, intensities keep the FBP values' ratios."""
    geo = _geometry((15, 16, 17), spacing=(1.5, 1.0, 0.8), offset=(3.0, -2.0, 1.5))
    vol = torch.zeros(1, 1, 15, 16, 17)
    vol[0, 0, 2:12, 4:12, 2:14] = 0.2  # aligned to 2x2x2 blocks: half-res [1:6, 2:6, 1:7], all 0.2
    vol[0, 0, 6:8, 8:10, 6:8] = 1.0  # one half-res voxel (3, 4, 3), zero gradient (central differences)
    g = init_from_fbp(vol, geo, num_gaussians=10_000, recipe="3dgr", threshold=0.05)
    assert g.dtype == torch.float32 and g.batch_size == 1
    count = 5 * 4 * 6
    assert g.num_gaussians == count - int(0.15 * count)  # fewer than asked: all that remain after the skip
    _assert_identity_rotations(g)
    half = np.stack(np.meshgrid(np.arange(1, 6), np.arange(2, 6), np.arange(1, 7), indexing="ij"), -1).reshape(-1, 3)
    candidates = _world(geo, 2.0 * half + 0.5)  # [120, 3] world mm of the plateau's half-res voxels
    means = g.means[0].double().numpy()
    dist = np.linalg.norm(means[:, None] - candidates[None], axis=-1)
    assert dist.min(axis=1).max() < 1e-4
    assert len(set(dist.argmin(axis=1).tolist())) == g.num_gaussians  # distinct voxels
    brightest = int(g.intensities[0].argmax())
    np.testing.assert_allclose(means[brightest], _world(geo, [6.5, 8.5, 6.5]), atol=1e-4)
    others = torch.cat((g.intensities[0, :brightest], g.intensities[0, brightest + 1:]))
    torch.testing.assert_close(others, torch.full_like(others, float(g.intensities[0, brightest]) * 0.2))
    assert _optimal_factor(g, vol, geo) == pytest.approx(1.0, rel=1e-4)  # one least-squares factor


def test_3dgr_odd_last_block_sits_on_its_lone_voxel():
    geo = _geometry((15, 16, 17), spacing=(1.5, 1.0, 0.8), offset=(-4.0, 0.0, 2.0))
    vol = torch.zeros(1, 1, 15, 16, 17, dtype=torch.float64)
    vol[0, 0, 14, 15, 16] = 0.8  # half-res block (7, 7, 8) holds 1 x 2 x 1 voxels: mean 0.4
    g = init_from_fbp(vol, geo, num_gaussians=5)
    assert g.num_gaussians == 1 and g.dtype == torch.float64
    np.testing.assert_allclose(g.means[0, 0].numpy(), _world(geo, [14.0, 14.5, 16.0]), atol=1e-12)
    h = 2.0 * (1.5 * 1.0 * 0.8) ** (1.0 / 3.0)
    torch.testing.assert_close(g.scales[0, 0], torch.full((3,), 0.5 * h * 5.0, dtype=torch.float64))  # alone
    assert _optimal_factor(g, vol, geo) == pytest.approx(1.0, rel=1e-8)


def test_3dgr_ranks_by_gradient_and_skips_the_top_15_percent():
    """Random values in a block of the half-resolution grid: the chosen voxels are exactly ranks
    [skip, skip + N) of the non-zero voxels by NumPy's central-difference gradient in mm."""
    spacing = (1.0, 1.25, 0.75)
    geo = _geometry((16, 16, 16), spacing=spacing)
    rng = np.random.default_rng(7)
    half = np.zeros((8, 8, 8))
    half[1:7, 1:7, 1:7] = rng.uniform(0.5, 1.5, size=(6, 6, 6))
    full = half.repeat(2, 0).repeat(2, 1).repeat(2, 2)  # 2x2x2 blocks: the half-res volume is `half` exactly
    vol = torch.from_numpy(full)[None, None]
    grads = np.gradient(half, *(2.0 * s for s in spacing))
    magnitude = np.sqrt(sum(gr**2 for gr in grads)).ravel()
    nonzero = np.flatnonzero(half)
    ranked = nonzero[np.argsort(-magnitude[nonzero], kind="stable")]
    skip = int(0.15 * nonzero.size)
    assert skip == 32
    num = 50
    g = init_from_fbp(vol, geo, num_gaussians=num, recipe="3dgr", threshold=0.1)
    idx = _index(geo, g.means[0].numpy())  # full-res centroids 2 i + 0.5
    half_idx = (idx - 0.5) / 2.0
    np.testing.assert_allclose(half_idx, np.round(half_idx), atol=1e-9)
    chosen = np.ravel_multi_index(tuple(np.round(half_idx).astype(np.int64).T), half.shape)
    assert sorted(chosen.tolist()) == sorted(ranked[skip:skip + num].tolist())
    # intensities: the half-res values times one factor
    ratio = g.intensities[0].numpy() / half.ravel()[chosen]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-12)
    # scales: selected neighbours in the 5x5x5 window (itself included), brute force
    selected = np.zeros(half.shape, dtype=bool)
    selected.ravel()[chosen] = True
    h = 2.0 * math.prod(spacing) ** (1.0 / 3.0)
    for k, (d, hh, w) in enumerate(np.round(half_idx).astype(int)):
        n = selected[max(d - 2, 0):d + 3, max(hh - 2, 0):hh + 3, max(w - 2, 0):w + 3].sum()
        np.testing.assert_allclose(g.scales[0, k].numpy(), 0.5 * h * (125.0 / n) ** (1.0 / 3.0), rtol=1e-12)
    # fewer remain than asked for: all after the skip
    assert init_from_fbp(vol, geo, num_gaussians=1000, threshold=0.1).num_gaussians == nonzero.size - skip


# ---------------------------------------------------------------------------------------------- r2
def test_r2_single_bright_voxel_world_frame():
    geo = _geometry((16, 18, 20), spacing=(2.0, 1.0, 0.5), offset=(5.0, -3.0, 7.0))
    vol = torch.zeros(1, 1, 16, 18, 20)
    vol[0, 0, 4, 9, 11] = 2.0
    vol[0, 0, 10, 2, 3] = 0.05  # below 0.05 * max: not a candidate
    g = init_from_fbp(vol, geo, num_gaussians=3, recipe="r2", threshold=0.05)
    assert g.num_gaussians == 1 and g.dtype == torch.float32
    np.testing.assert_allclose(g.means[0, 0].double().numpy(), _world(geo, [4, 9, 11]), atol=1e-5)
    assert torch.equal(g.intensities[0], 0.15 * vol[0, 0, 4, 9, 11].reshape(1))
    torch.testing.assert_close(g.scales[0, 0], torch.full((3,), 1.0))  # lone point: geometric-mean voxel size
    _assert_identity_rotations(g)


def test_r2_intensities_scales_and_seed():
    geo = _geometry((16, 16, 16), spacing=(1.5, 1.0, 0.8), offset=(0.0, 2.0, -1.0))
    vol = torch.rand(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    num = 60
    g = init_from_fbp(vol, geo, num_gaussians=num, recipe="r2", threshold=0.5, seed=11)
    assert g.num_gaussians == num and g.dtype == torch.float64
    _assert_identity_rotations(g)
    idx = _index(geo, g.means[0].numpy())
    np.testing.assert_allclose(idx, np.round(idx), atol=1e-9)  # voxel centres
    d, h, w = np.round(idx).astype(np.int64).T
    assert len(set(zip(d.tolist(), h.tolist(), w.tolist()))) == num  # without replacement
    values = vol[0, 0, d, h, w]
    assert bool((values > 0.5 * vol.max()).all())
    assert torch.equal(g.intensities[0], 0.15 * values)
    pts = g.means[0].numpy()
    d2 = ((pts[:, None] - pts[None]) ** 2).sum(-1)
    np.fill_diagonal(d2, np.inf)
    expected = np.sqrt(np.sort(d2, axis=1)[:, :3].mean(axis=1))
    np.testing.assert_allclose(g.scales[0].numpy(), np.repeat(expected[:, None], 3, axis=1), rtol=1e-10)
    again = init_from_fbp(vol, geo, num_gaussians=num, recipe="r2", threshold=0.5, seed=11)
    assert torch.equal(again.means, g.means) and torch.equal(again.scales, g.scales)
    other = init_from_fbp(vol, geo, num_gaussians=num, recipe="r2", threshold=0.5, seed=12)
    assert not torch.equal(other.means, g.means)


# ---------------------------------------------------------------------------------------------- random
def test_init_random_box_count_scales_and_determinism():
    geo = _geometry((16, 20, 24), spacing=(1.5, 1.0, 0.8), offset=(4.0, -6.0, 2.0))
    num = 2000
    g = init_random(geo, num_gaussians=num, seed=5)
    assert g.num_gaussians == num and g.batch_size == 1 and g.dtype == torch.float32
    _assert_identity_rotations(g)
    lo = _world(geo, [-0.5, -0.5, -0.5])
    hi = _world(geo, [15.5, 19.5, 23.5])
    means = g.means[0].double().numpy()
    assert (means >= lo - 1e-5).all() and (means <= hi + 1e-5).all()
    u = (means - lo) / (hi - lo)
    assert np.abs((u < 0.5).mean(axis=0) - 0.5).max() < 0.05  # spread over the whole box
    scale = (np.prod(hi - lo) / num) ** (1.0 / 3.0) / 2.0
    torch.testing.assert_close(g.scales, torch.full_like(g.scales, scale))
    torch.testing.assert_close(g.intensities, torch.full_like(g.intensities, DEFAULT_RANDOM_INTENSITY))
    assert torch.equal(init_random(geo, num_gaussians=num, seed=5).means, g.means)
    assert not torch.equal(init_random(geo, num_gaussians=num, seed=6).means, g.means)
    given = init_random(geo, num_gaussians=10, intensity=0.7)
    torch.testing.assert_close(given.intensities, torch.full((1, 10), 0.7))


def test_init_random_fits_one_factor_to_a_volume():
    geo = _geometry((16, 16, 16), spacing=(1.0, 1.0, 1.25))
    vol = torch.zeros(1, 1, 16, 16, 16, dtype=torch.float64)
    vol[0, 0, 3:13, 4:12, 2:14] = 0.02
    g = init_random(geo, num_gaussians=64, volume=vol, seed=1)
    assert g.dtype == torch.float64
    assert bool((g.intensities == g.intensities[0, 0]).all()) and float(g.intensities[0, 0]) > 0
    assert _optimal_factor(g, vol, geo) == pytest.approx(1.0, rel=1e-8)


# ---------------------------------------------------------------------------------------------- volume fit
def _known_gaussians_volume(geo: ConeBeamGeometry) -> torch.Tensor:
    means = torch.tensor([[[-4.0, 3.0, 2.0], [5.0, -2.0, -3.0], [0.0, 1.0, 6.0]]]) + torch.tensor(geo.vol_offset[::-1])
    scales = torch.tensor([[[3.0, 2.5, 3.5], [2.5, 2.5, 2.5], [4.0, 3.0, 2.0]]])
    quats = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.9, 0.1, 0.3, 0.0], [0.8, 0.0, 0.2, 0.4]]])
    world = Gaussians(means, scales, quats, torch.tensor([[0.02, 0.03, 0.015]]))
    return _render(world, geo)


def test_volume_fit_recovers_a_few_gaussians_far_better_than_random():
    geo = _geometry((16, 20, 24), spacing=(1.5, 1.0, 0.8), offset=(2.0, -1.0, 3.0))
    vol = _known_gaussians_volume(geo)
    g = init_from_volume_fit(vol, geo, num_gaussians=6, iterations=150, seed=0)
    assert g.num_gaussians == 6 and g.linear_map is None and g.dtype == torch.float32
    lo, hi = _world(geo, [-0.5, -0.5, -0.5]), _world(geo, [15.5, 19.5, 23.5])
    means = g.means[0].double().numpy()
    assert (means >= lo - 1e-4).all() and (means <= hi + 1e-4).all()
    fitted = _psnr(_render(g, geo), vol)
    random = _psnr(_render(init_random(geo, num_gaussians=6, volume=vol), geo), vol)
    assert fitted > 35.0, fitted
    assert fitted > random + 15.0, (fitted, random)


def test_volume_fit_centres_a_single_voxel_in_world_mm():
    geo = _geometry((16, 16, 16), spacing=(1.5, 1.0, 0.8), offset=(-3.0, 4.0, 1.0))
    vol = torch.zeros(1, 1, 16, 16, 16)
    vol[0, 0, 5, 7, 9] = 1.0
    g = init_from_volume_fit(vol, geo, num_gaussians=1, iterations=100)
    err = np.abs(g.means[0, 0].double().numpy() - _world(geo, [5, 7, 9]))
    assert (err < 0.05 * np.array([0.8, 1.0, 1.5])).all(), err  # within a twentieth of a voxel per axis


# ---------------------------------------------------------------------------------------------- errors
def test_errors_name_the_argument():
    geo = _geometry((8, 8, 8))
    vol = torch.rand(1, 1, 8, 8, 8)
    cases = [
        (lambda: init_from_fbp(vol[..., :7], geo, num_gaussians=4), "volume"),
        (lambda: init_from_fbp(vol[0], geo, num_gaussians=4), "volume"),
        (lambda: init_from_fbp(torch.full_like(vol, float("nan")), geo, num_gaussians=4), "volume"),
        (lambda: init_from_fbp(vol, geo, num_gaussians=4, recipe="sart"), "recipe"),
        (lambda: init_from_fbp(vol, geo, num_gaussians=0), "num_gaussians"),
        (lambda: init_from_fbp(vol, geo, num_gaussians=0, recipe="r2"), "num_gaussians"),
        (lambda: init_from_fbp(vol, geo, num_gaussians=4, threshold=-0.1), "threshold"),
        (lambda: init_from_fbp(torch.zeros_like(vol), geo, num_gaussians=4), "threshold"),
        (lambda: init_from_fbp(vol, geo, num_gaussians=4, threshold=2.0), "threshold"),
        (lambda: init_from_fbp(torch.zeros_like(vol), geo, num_gaussians=4, recipe="r2"), "threshold"),
        (lambda: init_from_fbp(vol, geo, num_gaussians=4, recipe="r2", threshold=1.0), "threshold"),
        (lambda: init_from_fbp(-vol, geo, num_gaussians=4, recipe="r2"), "threshold"),
        (lambda: init_from_fbp(vol, geo, num_gaussians=4, recipe="r2", seed=1.5), "seed"),
        (lambda: init_random(geo, num_gaussians=0), "num_gaussians"),
        (lambda: init_random(geo, num_gaussians=4, intensity=float("nan")), "intensity"),
        (lambda: init_random(geo, num_gaussians=4, volume=vol[..., :7]), "volume"),
        (lambda: init_random("geo", num_gaussians=4), "geometry"),
        (lambda: init_from_volume_fit(vol[..., :7], geo, num_gaussians=4), "volume"),
        (lambda: init_from_volume_fit(torch.full_like(vol, float("inf")), geo, num_gaussians=4), "volume"),
        (lambda: init_from_volume_fit(vol, geo, num_gaussians=0), "num_gaussians"),
        (lambda: init_from_volume_fit(vol, geo, num_gaussians=4, iterations=-1), "iterations"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()
