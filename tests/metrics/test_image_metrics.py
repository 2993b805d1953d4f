"""Metrics vs analytic cases and a float64 brute-force SSIM written here."""

import math

import pytest
import torch

from medgauss.metrics import projection_psnr, projection_ssim, psnr, ssim3d, ssim_slices


def brute_ssim(x, y, data_range, size=11, sigma=1.5):
    """Direct SSIM of one 2D or 3D float64 array: explicit windowed sums at every valid position."""
    x, y = x.double(), y.double()
    g1 = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g1 = g1 / g1.sum()
    win = g1
    for _ in range(x.ndim - 1):
        win = win[..., None] * g1
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    ranges = [range(n - size + 1) for n in x.shape]
    for start in torch.cartesian_prod(*[torch.tensor(list(r)) for r in ranges]).reshape(-1, x.ndim):
        sl = tuple(slice(int(s), int(s) + size) for s in start)
        px, py = x[sl], y[sl]
        mx, my = (win * px).sum(), (win * py).sum()
        vx = (win * (px - mx) ** 2).sum()
        vy = (win * (py - my) ** 2).sum()
        cxy = (win * (px - mx) * (py - my)).sum()
        values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return torch.stack(values).mean()


def pair(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=gen, dtype=torch.float64)
    b = (a + 0.1 * torch.randn(shape, generator=gen, dtype=torch.float64)).clamp(0, 1)
    return a, b


def test_psnr_known_mse_and_identical():
    target = torch.zeros(2, 1, 3, 4, 5)
    pred = torch.full_like(target, 0.1)
    torch.testing.assert_close(
        psnr(pred, target, data_range=1.0), torch.full((2,), 20.0, dtype=torch.float64)
    )
    expected = 10 * math.log10(4.0 / 0.01)
    torch.testing.assert_close(
        psnr(pred, target, data_range=2.0), torch.full((2,), expected, dtype=torch.float64)
    )
    assert torch.isinf(psnr(target, target, data_range=1.0)).all()
    proj = torch.zeros(1, 3, 4, 5)
    torch.testing.assert_close(
        projection_psnr(proj + 0.5, proj, data_range=5.0), torch.tensor([20.0], dtype=torch.float64)
    )


def test_ssim_of_identical_inputs_is_one():
    a, _ = pair((1, 1, 12, 13, 14))
    for value in (ssim_slices(a, a, data_range=1.0, axis="all"), ssim3d(a, a, data_range=1.0)):
        torch.testing.assert_close(value, torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(
        projection_ssim(a[0], a[0], data_range=1.0), torch.ones(1, dtype=torch.float64)
    )


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_ssim_matches_brute_force(axis):
    a, b = pair((1, 1, 13, 14, 12), seed=axis)
    expected = torch.stack(
        [brute_ssim(a[0, 0].select(axis, i), b[0, 0].select(axis, i), 1.0) for i in range(a.shape[2 + axis])]
    ).mean()
    torch.testing.assert_close(ssim_slices(a, b, data_range=1.0, axis=axis)[0], expected)


def test_ssim3d_and_projection_ssim_match_brute_force():
    a, b = pair((1, 1, 12, 13, 12), seed=5)
    torch.testing.assert_close(ssim3d(a, b, data_range=1.0)[0], brute_ssim(a[0, 0], b[0, 0], 1.0))
    p, q = pair((1, 2, 12, 13), seed=6)
    expected = (brute_ssim(p[0, 0], q[0, 0], 2.0) + brute_ssim(p[0, 1], q[0, 1], 2.0)) / 2
    torch.testing.assert_close(projection_ssim(p, q, data_range=2.0)[0], expected)


def test_metric_validation():
    a = torch.zeros(1, 1, 4, 4, 4)
    with pytest.raises(ValueError, match="data_range"):
        psnr(a, a, data_range=0.0)
    with pytest.raises(ValueError, match="shapes differ"):
        ssim3d(a, torch.zeros(1, 1, 4, 4, 5), data_range=1.0)
    with pytest.raises(ValueError, match=r"\[B, V, rows, cols\]"):
        projection_ssim(a, a, data_range=1.0)
    with pytest.raises(ValueError, match="axis"):
        ssim_slices(a, a, data_range=1.0, axis=3)
