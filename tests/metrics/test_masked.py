"""Masked-region metrics and trivial fills against hand-computed and brute-force float64 references."""

import math

import numpy as np
import pytest
import torch

from medgauss.metrics import (
    constant_fill,
    masked_mse,
    masked_psnr,
    masked_ssim,
    normalized_convolution_fill,
    ssim3d,
)


def test_masked_mse_and_psnr_by_hand():
    pred = torch.zeros(2, 1, 2, 2, 2)
    target = torch.zeros(2, 1, 2, 2, 2)
    target[0, 0, 0, 0, 0] = 1.0  # hidden, error 1
    target[0, 0, 1, 1, 1] = 3.0  # visible: ignored
    target[1, 0, 0, 1, 0] = 0.5
    hidden = torch.zeros(2, 1, 2, 2, 2, dtype=torch.bool)
    hidden[0, 0, 0] = True  # 4 hidden voxels, squared errors 1, 0, 0, 0
    hidden[1, 0, :, 1] = True  # 4 hidden voxels, squared errors 0.25, 0, 0, 0
    mse = masked_mse(pred, target, hidden)
    assert mse.tolist() == pytest.approx([0.25, 0.0625])
    psnr = masked_psnr(pred, target, hidden, data_range=2.0)
    assert psnr.tolist() == pytest.approx([10 * math.log10(4 / 0.25), 10 * math.log10(4 / 0.0625)])


def _brute_ssim_at(x, y, centre, size, sigma, data_range):
    """SSIM of the Gaussian window centred at ``centre`` (float64 loops, Wang et al. 2004)."""
    half = size // 2
    g1 = np.exp(-((np.arange(size) - half) ** 2) / (2 * sigma**2))
    g1 /= g1.sum()
    w = g1[:, None, None] * g1[None, :, None] * g1[None, None, :]
    sl = tuple(slice(c - half, c + half + 1) for c in centre)
    a, b = x[sl], y[sl]
    mx, my = (w * a).sum(), (w * b).sum()
    vx, vy = (w * a * a).sum() - mx**2, (w * b * b).sum() - my**2
    cxy = (w * a * b).sum() - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


def test_masked_ssim_averages_windows_centred_on_hidden_voxels():
    rng = np.random.default_rng(0)
    x = rng.random((9, 8, 10))
    y = x + 0.2 * rng.standard_normal(x.shape)
    hidden = np.zeros(x.shape, dtype=bool)
    centres = [(3, 3, 4), (4, 5, 6), (6, 4, 5)]
    for c in centres:
        hidden[c] = True
    hidden[0, 0, 0] = True  # at the border: no full window, not scored
    expected = np.mean([_brute_ssim_at(x, y, c, 5, 1.5, 1.0) for c in centres])
    t = lambda a: torch.tensor(a)[None, None]
    got = masked_ssim(t(y), t(x), torch.tensor(hidden)[None, None], data_range=1.0, window=5)
    assert float(got[0]) == pytest.approx(expected, rel=1e-10)
    assert float(masked_ssim(t(x), t(x), torch.tensor(hidden)[None, None], data_range=1.0, window=5)[0]) == 1.0
    everywhere = torch.ones(1, 1, 9, 8, 10, dtype=torch.bool)
    assert float(masked_ssim(t(y), t(x), everywhere, data_range=1.0, window=5)[0]) == pytest.approx(
        float(ssim3d(t(y), t(x), data_range=1.0, window=5)[0]), rel=1e-12)


def test_empty_or_border_only_masks_raise():
    x = torch.rand(2, 1, 8, 8, 8)
    hidden = torch.zeros(2, 1, 8, 8, 8, dtype=torch.bool)
    hidden[0, 0, 4, 4, 4] = True
    with pytest.raises(ValueError, match=r"hidden is empty for batch item\(s\) \[1\]"):
        masked_mse(x, x, hidden)
    hidden[1, 0, 0, 0, 0] = True
    with pytest.raises(ValueError, match=r"no voxel away from the border.*\[1\]"):
        masked_ssim(x, x, hidden, data_range=1.0, window=5)
    with pytest.raises(ValueError, match="hidden must have shape"):
        masked_mse(x, x, hidden[:, :, :4])
    with pytest.raises(ValueError, match="bool"):
        masked_mse(x, x, hidden.float())


def test_constant_fill_is_the_visible_mean():
    rng = np.random.default_rng(1)
    x = rng.random((2, 1, 5, 6, 7))
    hidden = rng.random((2, 1, 5, 6, 7)) < 0.7
    out = constant_fill(torch.tensor(x), torch.tensor(hidden)).numpy()
    for b in range(2):
        vis = ~hidden[b, 0]
        np.testing.assert_allclose(out[b, 0][vis], x[b, 0][vis])
        np.testing.assert_allclose(out[b, 0][~vis], x[b, 0][vis].mean())


def test_normalized_convolution_fill_equals_brute_force_neighbourhood_means():
    rng = np.random.default_rng(2)
    x = rng.random((1, 1, 7, 6, 9))
    hidden = rng.random(x.shape) < 0.75
    hidden[0, 0, :4, :4, :4] = True  # a hole wider than the box: falls back to the visible mean there
    out = normalized_convolution_fill(torch.tensor(x), torch.tensor(hidden), box=3).numpy()
    vis = ~hidden[0, 0]
    for d, h, w in zip(*np.nonzero(hidden[0, 0])):
        sl = (slice(max(d - 1, 0), d + 2), slice(max(h - 1, 0), h + 2), slice(max(w - 1, 0), w + 2))
        near = x[0, 0][sl][vis[sl]]
        expected = near.mean() if near.size else x[0, 0][vis].mean()
        assert out[0, 0, d, h, w] == pytest.approx(expected, rel=1e-12)
    np.testing.assert_array_equal(out[0, 0][vis], x[0, 0][vis])


def test_fills_refuse_items_with_nothing_visible():
    x = torch.rand(1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="no visible voxel"):
        constant_fill(x, torch.ones(1, 1, 4, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="box must be an odd"):
        normalized_convolution_fill(x, torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool), box=4)
