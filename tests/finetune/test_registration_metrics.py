"""Registration metrics against analytic fields and float64 brute force: the Jacobian determinant of x + A x is
det(I + A) everywhere, a known fold is negative, a random field matches numpy; Dice against a numpy count."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medgauss.metrics import dice_per_class, jacobian_determinant, nonpositive_jacobian_fraction

SHAPE = (7, 8, 9)


def _coords() -> torch.Tensor:
    axes = [torch.arange(n, dtype=torch.float64) for n in SHAPE]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))  # [3, D, H, W]


def test_a_linear_map_has_det_of_identity_plus_a_everywhere():
    a = torch.tensor([[0.1, -0.2, 0.05], [0.3, -0.1, 0.2], [-0.15, 0.25, 0.4]], dtype=torch.float64)
    u = torch.einsum("ij,j...->i...", a, _coords())[None]
    det = jacobian_determinant(u)
    assert det.shape == (1, *SHAPE)
    expected = float(np.linalg.det(np.eye(3) + a.numpy()))
    torch.testing.assert_close(det, torch.full_like(det, expected), rtol=0, atol=1e-12)
    assert float(nonpositive_jacobian_fraction(u)[0]) == 0.0


def test_a_reflection_folds_everywhere_and_a_quadratic_folds_where_expected():
    x = _coords()
    u = torch.zeros(1, 3, *SHAPE, dtype=torch.float64)
    u[0, 0] = -2.0 * x[0]  # x_0 -> -x_0: det = -1
    torch.testing.assert_close(jacobian_determinant(u), torch.full((1, *SHAPE), -1.0, dtype=torch.float64))
    assert float(nonpositive_jacobian_fraction(u)[0]) == 1.0
    u[0, 0] = -0.25 * x[0] ** 2 / 2  # du_0/dx_0 = -0.25 x_0 (central differences exact in the interior)
    det = jacobian_determinant(u)[0]
    interior = 1.0 - 0.25 * torch.arange(1, SHAPE[0] - 1, dtype=torch.float64)
    torch.testing.assert_close(det[1:-1], interior[:, None, None].expand(-1, *SHAPE[1:]))
    assert bool((det[4:-1] <= 0).all()) and bool((det[:4] > 0).all())


def _det3(m: np.ndarray) -> float:
    return (m[0, 0] * (m[1, 1] * m[2, 2] - m[1, 2] * m[2, 1]) - m[0, 1] * (m[1, 0] * m[2, 2] - m[1, 2] * m[2, 0])
            + m[0, 2] * (m[1, 0] * m[2, 1] - m[1, 1] * m[2, 0]))


def _derivative(f: np.ndarray, axis: int, idx: tuple[int, int, int]) -> float:
    n = f.shape[axis]
    i = idx[axis]
    lo, hi = list(idx), list(idx)
    if i == 0:
        hi[axis] = 1
        return float(f[tuple(hi)] - f[idx])
    if i == n - 1:
        lo[axis] = n - 2
        return float(f[idx] - f[tuple(lo)])
    lo[axis], hi[axis] = i - 1, i + 1
    return float((f[tuple(hi)] - f[tuple(lo)]) / 2.0)


def test_random_field_matches_a_float64_brute_force():
    rng = np.random.default_rng(0)
    u = rng.normal(scale=0.6, size=(2, 3, *SHAPE))
    det = jacobian_determinant(torch.from_numpy(u)).numpy()
    frac = nonpositive_jacobian_fraction(torch.from_numpy(u)).numpy()
    for b in range(2):
        brute = np.empty(SHAPE)
        for idx in np.ndindex(*SHAPE):
            jac = np.eye(3) + np.array([[_derivative(u[b, a], c, idx) for c in range(3)] for a in range(3)])
            brute[idx] = _det3(jac)
        np.testing.assert_allclose(det[b], brute, rtol=1e-10, atol=1e-12)
        assert frac[b] == pytest.approx(float((brute <= 0).mean()), abs=1e-12)
    assert 0 < frac.min() < 1  # the test field does fold somewhere


def test_ddf_is_checked():
    with pytest.raises(ValueError, match="ddf"):
        jacobian_determinant(torch.zeros(1, 2, 4, 4, 4))
    with pytest.raises(ValueError, match="ddf"):
        jacobian_determinant(torch.zeros(1, 3, 4, 4, 1))


def test_dice_matches_a_numpy_count_and_absent_classes_are_nan():
    rng = np.random.default_rng(1)
    pred = rng.integers(0, 4, size=(3, 1, 6, 5, 4))
    true = rng.integers(0, 4, size=(3, 1, 6, 5, 4))
    true[2][true[2] == 3] = 0
    pred[2][pred[2] == 3] = 1  # class 3 absent from both maps of sample 2
    dice = dice_per_class(torch.from_numpy(pred), torch.from_numpy(true), num_classes=5).numpy()
    assert dice.shape == (3, 5) and dice.dtype == np.float64
    for b in range(3):
        for k in range(5):
            p, t = pred[b] == k, true[b] == k
            if p.sum() + t.sum() == 0:
                assert math.isnan(dice[b, k])
            else:
                assert dice[b, k] == pytest.approx(2 * (p & t).sum() / (p.sum() + t.sum()), abs=1e-15)
    assert math.isnan(dice[2, 3]) and math.isnan(dice[0, 4])
    same = dice_per_class(torch.from_numpy(true[0, 0]), torch.from_numpy(true[0, 0]), 4)  # [D, H, W] accepted
    assert same.shape == (1, 4) and torch.all(same == 1.0)


def test_dice_checks_its_arguments():
    a = torch.zeros(1, 4, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="same shape"):
        dice_per_class(a, torch.zeros(1, 4, 4, 5, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="true_labels"):
        dice_per_class(a, a + 2, 2)
    with pytest.raises(ValueError, match="pred_labels"):
        dice_per_class(a.float() + 0.5, a, 2)
    with pytest.raises(ValueError, match="num_classes"):
        dice_per_class(a, a, 0)
