"""MedGMAE* residual levels against a direct, per-child computation of the issue's formulas."""

import torch
import torch.nn.functional as F

from medgauss.gaussians import Gaussians
from medgauss.nets.hierarchy import ResidualLevels, keep_positive


def _parents(b, n0, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    return Gaussians(torch.rand(b, n0, 3, generator=g, dtype=dtype),
                     0.01 + 0.1 * torch.rand(b, n0, 3, generator=g, dtype=dtype),
                     torch.randn(b, n0, 4, generator=g, dtype=dtype),
                     torch.rand(b, n0, generator=g, dtype=dtype))


def test_residual_levels_match_formulas_child_by_child():
    torch.manual_seed(0)
    b, n0, dim = 2, 3, 5
    sig = dict(sigma_scale=0.1, sigma_mean=0.05, sigma_intensity=0.2, sigma_rotation=0.3)
    levels = ResidualLevels(dim, (2, 4), (0.02, 0.05), min_scale=1e-3, **sig).double()
    for head in levels.heads:  # larger weights so tanh is far from linear
        torch.nn.init.normal_(head.weight, std=1.0)
        torch.nn.init.normal_(head.bias, std=1.0)
    parents = _parents(b, n0)
    features = torch.randn(b, n0, dim, dtype=torch.float64)
    outs = levels(parents, features)
    assert [o.num_gaussians for o in outs] == [2 * n0, 4 * n0]
    for level, (m, delta) in enumerate(zip((2, 4), (0.02, 0.05))):
        w, bias = levels.heads[level].weight, levels.heads[level].bias
        for s in range(b):
            for i in range(n0):
                raw = torch.tanh(features[s, i] @ w.T + bias)
                for j in range(m):
                    r = raw[j * 11:(j + 1) * 11]
                    child = outs[level][s:s + 1, [i * m + j]]
                    scale = parents.scales[s, i] + r[0:3] * 0.1 - delta
                    scale = 1e-3 + F.softplus(scale - 1e-3, beta=1000.0, threshold=30.0)
                    mean = parents.means[s, i] + r[3:6] * 0.05
                    intensity = parents.intensities[s, i] + r[6] * 0.2
                    quat = parents.quats[s, i] + r[7:11] * 0.3
                    quat = quat / quat.norm()
                    torch.testing.assert_close(child.scales[0, 0], scale)
                    torch.testing.assert_close(child.means[0, 0], mean)
                    torch.testing.assert_close(child.intensities[0, 0], intensity)
                    torch.testing.assert_close(child.quats[0, 0], quat)


def test_children_scales_stay_positive_with_large_offsets():
    levels = ResidualLevels(4, (3,), (10.0,), min_scale=2e-3).double()
    children = levels(_parents(1, 5), torch.randn(1, 5, 4, dtype=torch.float64))[0]
    assert (children.scales >= 2e-3).all()


def test_keep_positive_is_identity_above_the_floor_and_positive_below():
    s = torch.tensor([-1.0, -1e-3, 0.0, 1e-3, 0.1, 0.5], dtype=torch.float64)
    out = keep_positive(s, 2e-3)
    assert (out >= 2e-3).all()
    torch.testing.assert_close(out[4:], s[4:], rtol=0, atol=1e-12)
    s.requires_grad_(True)
    (grad,) = torch.autograd.grad(keep_positive(s, 2e-3).sum(), s)
    assert (grad[:-2] >= 0).all() and (grad[3:] > 0).all()


def test_residual_gradients_match_finite_differences():
    torch.manual_seed(1)
    levels = ResidualLevels(3, (2,), (0.02,), min_scale=1e-2).double()
    parents = _parents(1, 2)
    features = torch.randn(1, 2, 3, dtype=torch.float64, requires_grad=True)
    means = parents.means.clone().requires_grad_(True)
    scales = parents.scales.clone().requires_grad_(True)

    def fn(feat, mu, sc):
        g = levels(Gaussians(mu, sc, parents.quats, parents.intensities), feat)[0]
        return g.means, g.scales, g.quats, g.intensities

    assert torch.autograd.gradcheck(fn, (features, means, scales))
