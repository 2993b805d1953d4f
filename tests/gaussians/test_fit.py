"""fit_gaussians_to_volume: recovers known Gaussians, decreasing loss, determinism, masks, units, bad input.

References are independent of the fitting code: the targets are splats of Gaussians written here, PSNR and
the masked MSE are recomputed in the tests from ``splat`` and the volume, centres are matched to the
known ones by brute force over permutations.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from medgauss.gaussians import FitResult, Gaussians, fit_gaussians_to_volume, init_gaussians_from_volume
from medgauss.render import splat

SHAPE = (20, 20, 20)


def _known_gaussians(dtype: torch.dtype) -> Gaussians:
    """Four well separated, anisotropic, rotated Gaussians of different peaks inside a 20^3 volume."""
    means = [[0.3, 0.3, 0.35], [0.7, 0.3, 0.6], [0.35, 0.7, 0.7], [0.7, 0.7, 0.3]]
    scales = [[0.08, 0.12, 0.06], [0.1, 0.07, 0.09], [0.06, 0.06, 0.11], [0.09, 0.1, 0.08]]
    quats = [[1.0, 0.2, 0.1, 0.0], [0.9, 0.0, 0.3, 0.2], [1.0, 0.0, 0.0, 0.0], [0.8, 0.3, -0.2, 0.1]]
    t = [torch.tensor([x], dtype=dtype) for x in (means, scales, quats, [0.9, 0.6, 1.0, 0.7])]
    return Gaussians(*t)


def _smooth_volume(shape: tuple[int, int, int], batch: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """``[batch, 1, *shape]`` sums of 20 random Gaussians: a smooth, structured target (not a sum of few)."""
    gen = torch.Generator().manual_seed(seed)
    n = 20
    g = Gaussians(torch.rand(batch, n, 3, generator=gen, dtype=dtype) * 0.8 + 0.1,
                  torch.rand(batch, n, 3, generator=gen, dtype=dtype) * 0.1 + 0.04,
                  torch.randn(batch, n, 4, generator=gen, dtype=dtype),
                  torch.rand(batch, n, generator=gen, dtype=dtype) * 0.5 + 0.1)
    return splat(g, shape)


def _psnr(gaussians: Gaussians, volume: torch.Tensor) -> float:
    mse = (splat(gaussians, volume.shape[2:]) - volume).square().mean().item()
    return 10 * math.log10(volume.max().item() ** 2 / mse)


@pytest.mark.parametrize("dtype, threshold", [(torch.float64, 60.0), (torch.float32, 35.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_known_gaussians(dtype, threshold, seed):
    truth = _known_gaussians(dtype)
    volume = splat(truth, SHAPE)
    result = fit_gaussians_to_volume(volume, 4, iterations=300, seed=seed)
    assert isinstance(result, FitResult) and result.iterations == 300
    g = result.gaussians
    assert (g.batch_size, g.num_gaussians, g.dtype) == (1, 4, dtype)
    assert _psnr(g, volume) > threshold
    # The fitted centres are the true ones, in some order (brute force over the 24 permutations).
    err = min((g.means[0, list(p)] - truth.means[0]).abs().max().item() for p in itertools.permutations(range(4)))
    assert err < 0.01  # a fifth of a voxel
    # The recorded history: one entry per evaluated state, the last being the returned Gaussians' MSE.
    assert result.losses.shape == (301, 1) and result.losses.dtype == dtype
    mse = (splat(g, SHAPE) - volume).square().mean()
    torch.testing.assert_close(result.losses[-1, 0], mse, rtol=1e-4, atol=1e-12)


def test_loss_decreases():
    volume = _smooth_volume((16, 18, 14), 2, torch.float32, seed=3)
    result = fit_gaussians_to_volume(volume, 12, iterations=120, seed=0)
    losses = result.losses.double()
    assert (losses[-1] < 0.25 * losses[0]).all()
    # Non-increasing on average: means over blocks of 20 iterations never rise by more than 5%.
    blocks = losses[:120].reshape(6, 20, 2).mean(dim=1)
    assert (blocks[1:] <= 1.05 * blocks[:-1]).all(), blocks


def test_deterministic_for_a_seed():
    volume = _smooth_volume((12, 12, 12), 2, torch.float64, seed=1)
    a = fit_gaussians_to_volume(volume, 8, iterations=25, seed=7)
    b = fit_gaussians_to_volume(volume, 8, iterations=25, seed=7)
    c = fit_gaussians_to_volume(volume, 8, iterations=25, seed=8)
    for field in ("means", "scales", "quats", "intensities"):
        assert torch.equal(getattr(a.gaussians, field), getattr(b.gaussians, field)), field
    assert torch.equal(a.losses, b.losses)
    assert not torch.equal(a.gaussians.means, c.gaussians.means)


def test_samples_of_a_batch_are_fitted_independently():
    """Sample 0's fit does not depend on what else is in the batch (the objective is a sum over samples)."""
    vols = _smooth_volume((12, 12, 12), 3, torch.float64, seed=2)
    ab = fit_gaussians_to_volume(vols[[0, 1]], 6, iterations=20)
    ac = fit_gaussians_to_volume(vols[[0, 2]], 6, iterations=20)
    torch.testing.assert_close(ab.gaussians.means[0], ac.gaussians.means[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(ab.losses[:, 0], ac.losses[:, 0], rtol=1e-12, atol=0)
    assert not torch.allclose(ab.losses[:, 1], ac.losses[:, 1])


def test_mask_restricts_the_loss():
    volume = _smooth_volume((14, 14, 14), 1, torch.float64, seed=4)
    mask = torch.zeros_like(volume, dtype=torch.bool)
    mask[..., 2:11, 3:12, 1:9] = True
    garbage = torch.where(mask, volume, torch.rand(volume.shape, generator=torch.Generator().manual_seed(0),
                                                   dtype=volume.dtype) * 5 - 2)
    a = fit_gaussians_to_volume(volume, 6, weights=mask, iterations=30)
    b = fit_gaussians_to_volume(garbage, 6, weights=mask, iterations=30)
    for field in ("means", "scales", "quats", "intensities"):
        assert torch.equal(getattr(a.gaussians, field), getattr(b.gaussians, field)), field
    # The reported loss is the MSE over the mask only (recomputed here) ...
    sq = (splat(a.gaussians, volume.shape[2:]) - volume).square()
    torch.testing.assert_close(a.losses[-1, 0], sq[mask].mean(), rtol=1e-6, atol=0)
    # ... and without the mask the voxels outside do change the fit (so the check above can fail).
    c = fit_gaussians_to_volume(volume, 6, iterations=30)
    d = fit_gaussians_to_volume(garbage, 6, iterations=30)
    assert not torch.allclose(c.gaussians.means, d.gaussians.means)


def test_soft_weights_are_a_weighted_mean():
    volume = _smooth_volume((10, 10, 10), 1, torch.float64, seed=5)
    weights = torch.rand(volume.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    result = fit_gaussians_to_volume(volume, 4, weights=weights, iterations=5)
    sq = (splat(result.gaussians, volume.shape[2:]) - volume).square()
    torch.testing.assert_close(result.losses[-1, 0], (sq * weights).sum() / weights.sum(), rtol=1e-6, atol=0)


def test_units_do_not_change_the_fit():
    """Amplitude normalisation: a volume in other units gives the same centres and scaled intensities."""
    volume = _smooth_volume((12, 12, 12), 1, torch.float64, seed=6)
    a = fit_gaussians_to_volume(volume, 6, iterations=30)
    b = fit_gaussians_to_volume(volume * 0.02, 6, iterations=30)
    # Equal up to rounding, which Adam's normalised steps amplify a little (1e-4 = a 1/800 voxel here).
    torch.testing.assert_close(b.gaussians.means, a.gaussians.means, rtol=0, atol=1e-4)
    torch.testing.assert_close(b.gaussians.intensities, 0.02 * a.gaussians.intensities, rtol=1e-3, atol=0)
    torch.testing.assert_close(b.losses, 0.02**2 * a.losses, rtol=1e-3, atol=0)


def test_intensity_init_places_centres_where_the_volume_is():
    volume = torch.zeros(1, 1, 16, 16, 16, dtype=torch.float64)
    volume[..., 4:12, 2:6, 8:16] = 1.0
    g = init_gaussians_from_volume(volume, 20, seed=3)
    vox = g.means[0] * 16
    assert ((vox[:, 0] >= 4) & (vox[:, 0] <= 12) & (vox[:, 1] >= 2) & (vox[:, 1] <= 6) & (vox[:, 2] >= 8)).all()
    # Under a mask the centres stay inside it, however bright the volume is elsewhere.
    mask = torch.zeros_like(volume, dtype=torch.bool)
    mask[..., :8, :, :] = True
    g = init_gaussians_from_volume(volume + 0.1, 20, weights=mask, seed=3)
    assert (g.means[0, :, 0] <= 0.5).all()
    assert torch.equal(g.quats[..., 0], torch.ones(1, 20, dtype=torch.float64))


def test_grid_init_on_an_anisotropic_volume():
    volume = _smooth_volume((12, 16, 24), 1, torch.float32, seed=7)
    g = init_gaussians_from_volume(volume, 30, init="grid", max_scale=1.0)
    assert g.num_gaussians == 30 and g.dtype == torch.float32
    vox = g.means[0] * torch.tensor([12.0, 16.0, 24.0])
    assert torch.cdist(vox, vox).add(torch.eye(30) * 1e3).min() > 2.0  # spread out, no two in one place
    # Isotropic in voxels: scale * size is the same along every axis.
    in_voxels = g.scales[0] * torch.tensor([12.0, 16.0, 24.0])
    torch.testing.assert_close(in_voxels, in_voxels[:, :1].expand(-1, 3), rtol=1e-5, atol=0)
    result = fit_gaussians_to_volume(volume, 30, init="grid", iterations=40)
    assert result.losses[-1, 0] < 0.5 * result.losses[0, 0]


def test_callback_sees_each_state_and_can_stop():
    volume = _smooth_volume((10, 10, 10), 1, torch.float64, seed=8)
    seen = []

    def callback(step: int, gaussians: Gaussians, losses: torch.Tensor) -> bool:
        seen.append((step, gaussians, losses))
        return step == 5

    result = fit_gaussians_to_volume(volume, 4, iterations=50, callback=callback)
    assert [s for s, _, _ in seen] == list(range(6))
    assert result.iterations == 5 and result.losses.shape == (6, 1)
    assert torch.equal(result.gaussians.means, seen[-1][1].means)
    assert torch.equal(result.losses[-1], seen[-1][2])


def test_zero_iterations_and_empty_batch():
    volume = _smooth_volume((8, 8, 8), 1, torch.float64, seed=9)
    result = fit_gaussians_to_volume(volume, 3, iterations=0)
    assert result.iterations == 0 and result.losses.shape == (1, 1)
    init = init_gaussians_from_volume(volume, 3)
    assert torch.equal(result.gaussians.means, init.means)
    empty = fit_gaussians_to_volume(torch.zeros(0, 1, 8, 8, 8), 5, iterations=3)
    assert (empty.gaussians.batch_size, empty.gaussians.num_gaussians) == (0, 5)
    assert empty.losses.shape == (4, 0)


def test_scales_stay_within_bounds():
    volume = _smooth_volume((10, 10, 10), 1, torch.float64, seed=10)
    result = fit_gaussians_to_volume(volume, 5, iterations=40, min_scale=0.05, max_scale=0.07)
    s = result.gaussians.scales
    assert (s >= 0.05 * (1 - 1e-12)).all() and (s <= 0.07 * (1 + 1e-12)).all()
    assert ((result.gaussians.means >= 0) & (result.gaussians.means <= 1)).all()


_VOL = torch.rand(1, 1, 6, 6, 6, dtype=torch.float64)


@pytest.mark.parametrize("kwargs, name", [
    (dict(volume=torch.rand(1, 6, 6, 6)), "volume"),
    (dict(volume=torch.rand(1, 2, 6, 6, 6)), "volume"),
    (dict(volume=torch.ones(1, 1, 6, 6, 6, dtype=torch.int32)), "volume"),
    (dict(volume=torch.ones(1, 1, 6, 6, 6, dtype=torch.float16)), "volume"),
    (dict(volume=torch.full((1, 1, 6, 6, 6), float("nan"))), "volume"),
    (dict(volume=_VOL.numpy()), "volume"),
    (dict(num_gaussians=0), "num_gaussians"),
    (dict(num_gaussians=2.5), "num_gaussians"),
    (dict(num_gaussians=True), "num_gaussians"),
    (dict(iterations=-1), "iterations"),
    (dict(weights=torch.ones(1, 1, 6, 6, 5, dtype=torch.float64)), "weights"),
    (dict(weights=-torch.ones_like(_VOL)), "weights"),
    (dict(weights=torch.full_like(_VOL, float("inf"))), "weights"),
    (dict(weights=torch.zeros_like(_VOL)), "weights"),
    (dict(weights=torch.ones_like(_VOL, dtype=torch.int64)), "weights"),
    (dict(lr={"position": 1e-3}), "lr"),
    (dict(lr={"means": -1.0}), "lr"),
    (dict(lr=0.0), "lr"),
    (dict(lr_final_ratio=0.0), "lr_final_ratio"),
    (dict(lr_final_ratio=2.0), "lr_final_ratio"),
    (dict(init="random"), "init"),
    (dict(seed=1.5), "seed"),
    (dict(scale_factor=0.0), "scale_factor"),
    (dict(min_scale=0.2, max_scale=0.1), "min_scale"),
    (dict(max_scale=float("nan")), "max_scale"),
    (dict(min_scale=-1.0), "min_scale"),
    (dict(callback=3), "callback"),
    (dict(cutoff=-1.0), "cutoff"),
])
def test_bad_input_raises_naming_the_argument(kwargs, name):
    args = dict(volume=_VOL, num_gaussians=3, iterations=2) | kwargs
    with pytest.raises(ValueError, match=name):
        fit_gaussians_to_volume(args.pop("volume"), args.pop("num_gaussians"), **args)
