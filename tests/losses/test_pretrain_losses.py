"""Pretraining losses against independent dense float64 computations."""

import math

import pytest
import torch

from medgauss.gaussians import Gaussians
from medgauss.losses import MaskedGaussianLoss, MaskedPatchLoss, pretrain_loss_for
from medgauss.nets import GaussianMAE, GaussianMAEOutput, VoxelMAE, VoxelMAEOutput
from medgauss.render import splat

GRID, PATCH = (2, 3, 2), (3, 2, 4)
SHAPE = tuple(g * p for g, p in zip(GRID, PATCH))  # (6, 6, 8)


def _mask(b=2, hidden=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    length = math.prod(GRID)
    mask = torch.zeros(b, length, dtype=torch.bool)
    for i in range(b):
        mask[i, torch.randperm(length, generator=g)[:hidden]] = True
    return mask


def _gaussians(b=2, n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    return Gaussians(0.1 + 0.8 * torch.rand(b, n, 3, generator=g, dtype=f64),
                     0.08 + 0.2 * torch.rand(b, n, 3, generator=g, dtype=f64),
                     torch.randn(b, n, 4, generator=g, dtype=f64),
                     torch.rand(b, n, generator=g, dtype=f64))


def _gaussian_output(gaussians, mask):
    ids = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
    return GaussianMAEOutput(gaussians, mask, torch.argsort(ids, dim=1), ids[:, :3], GRID, PATCH, (5,))


def _dense_brute_force(g, shape, cutoff):
    """Sum of Gaussians at every voxel centre, from the quaternion formula and a matrix inverse."""
    b, n = g.means.shape[:2]
    w, x, y, z = g.quats.unbind(-1)  # unit quaternions (the container normalised them)
    rot = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).reshape(b, n, 3, 3)
    cov = rot @ torch.diag_embed(g.scales ** 2) @ rot.transpose(-1, -2)
    prec = torch.linalg.inv(cov)
    out = torch.zeros(b, *shape, dtype=torch.float64)
    for d in range(shape[0]):
        for h in range(shape[1]):
            for wi in range(shape[2]):
                p = torch.tensor([(d + 0.5) / shape[0], (h + 0.5) / shape[1], (wi + 0.5) / shape[2]],
                                 dtype=torch.float64)
                r = p - g.means
                q = torch.einsum("bni,bnij,bnj->bn", r, prec, r)
                val = g.intensities * torch.exp(-0.5 * q)
                if cutoff is not None:
                    val = torch.where(q < cutoff ** 2, val, torch.zeros_like(val))
                out[:, d, h, wi] = val.sum(-1)
    return out


def _hidden_voxels(mask):
    """[B, D, H, W] bool by explicit patch lookup."""
    vol = torch.zeros(mask.shape[0], *SHAPE, dtype=torch.bool)
    for d in range(SHAPE[0]):
        for h in range(SHAPE[1]):
            for w in range(SHAPE[2]):
                index = ((d // PATCH[0]) * GRID[1] + h // PATCH[1]) * GRID[2] + w // PATCH[2]
                vol[:, d, h, w] = mask[:, index]
    return vol


@pytest.mark.parametrize("cutoff", [None, 3.0, 1.5])
def test_masked_gaussian_loss_equals_dense_brute_force(cutoff):
    g, mask = _gaussians(), _mask()
    images = torch.rand(2, 1, *SHAPE, dtype=torch.float64)
    loss = MaskedGaussianLoss(cutoff=cutoff, backend="torch")(_gaussian_output(g, mask), images)
    dense = _dense_brute_force(g, SHAPE, cutoff)
    hidden = _hidden_voxels(mask)
    expected = ((dense - images[:, 0]) ** 2)[hidden].mean()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)


def test_masked_gaussian_loss_equals_dense_splat_gathered_at_mask():
    g, mask = _gaussians(seed=5), _mask(seed=6)
    images = torch.rand(2, 1, *SHAPE, dtype=torch.float64)
    loss = MaskedGaussianLoss(backend="torch")(_gaussian_output(g, mask), images)
    dense = splat(g, SHAPE, backend="torch")
    hidden = _hidden_voxels(mask)[:, None]
    torch.testing.assert_close(loss, ((dense - images) ** 2)[hidden].mean(), rtol=1e-13, atol=1e-15)


def test_masked_gaussian_loss_gradcheck():
    g0, mask = _gaussians(b=1, n=3, seed=2), _mask(b=1, hidden=3, seed=3)
    images = torch.rand(1, 1, *SHAPE, dtype=torch.float64)
    loss_fn = MaskedGaussianLoss(cutoff=None, backend="torch")

    def fn(means, scales, quats, intensities):
        return loss_fn(_gaussian_output(Gaussians(means, scales, quats, intensities), mask), images)

    inputs = tuple(t.detach().clone().requires_grad_(True)
                   for t in (g0.means, g0.scales, g0.quats, g0.intensities))
    assert torch.autograd.gradcheck(fn, inputs)


def _voxel_output(pred, mask):
    ids = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
    return VoxelMAEOutput(pred, mask, torch.argsort(ids, dim=1), ids[:, :3], GRID, PATCH)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_masked_patch_loss_matches_loop(norm_pix_loss):
    torch.manual_seed(0)
    mask = _mask()
    images = torch.rand(2, 1, *SHAPE, dtype=torch.float64)
    pred = torch.randn(2, math.prod(GRID), math.prod(PATCH), dtype=torch.float64, requires_grad=True)
    loss = MaskedPatchLoss(norm_pix_loss=norm_pix_loss)(_voxel_output(pred, mask), images)
    total, count = 0.0, 0
    for b in range(2):
        for gd in range(GRID[0]):
            for gh in range(GRID[1]):
                for gw in range(GRID[2]):
                    index = (gd * GRID[1] + gh) * GRID[2] + gw
                    if not mask[b, index]:
                        continue
                    block = images[b, 0, gd * 3:(gd + 1) * 3, gh * 2:(gh + 1) * 2, gw * 4:(gw + 1) * 4]
                    target = block.reshape(-1)  # (pd, ph, pw) C order, one channel
                    if norm_pix_loss:
                        target = (target - target.mean()) / (target.var() + 1e-6).sqrt()
                    total = total + ((pred[b, index] - target) ** 2).mean()
                    count += 1
    torch.testing.assert_close(loss, total / count, rtol=1e-12, atol=1e-14)
    (grad,) = torch.autograd.grad(loss, pred)
    assert grad[~mask].abs().max() == 0 and grad[mask].abs().min() > 0  # only hidden patches count


def test_pretrain_loss_for_picks_the_right_loss():
    kw = dict(img_size=8, patch_size=4, hidden_size=12, num_layers=1, num_heads=2, mlp_dim=24, decoder_dim=12,
              decoder_depth=1, decoder_heads=2)
    g_loss = pretrain_loss_for(GaussianMAE(**kw, num_queries=2), backend="torch", cutoff=2.0)
    assert isinstance(g_loss, MaskedGaussianLoss) and g_loss.backend == "torch" and g_loss.cutoff == 2.0
    v_loss = pretrain_loss_for(VoxelMAE(**kw), norm_pix_loss=True)
    assert isinstance(v_loss, MaskedPatchLoss) and v_loss.norm_pix_loss
    with pytest.raises(ValueError, match="GaussianMAE or VoxelMAE"):
        pretrain_loss_for(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_masked_gaussian_loss_default_backend_matches_torch():
    g, mask = _gaussians(), _mask()
    images = torch.rand(2, 1, *SHAPE, dtype=torch.float64)
    out = _gaussian_output(g, mask)
    torch.testing.assert_close(MaskedGaussianLoss()(out, images),
                               MaskedGaussianLoss(backend="torch")(out, images), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("weight", [0.0, 0.5, 2.0])
def test_visible_weight_adds_the_visible_voxels_mse(weight):
    g, mask = _gaussians(seed=7), _mask(seed=8)
    images = torch.rand(2, 1, *SHAPE, dtype=torch.float64)
    loss = MaskedGaussianLoss(cutoff=None, backend="torch", visible_weight=weight)(_gaussian_output(g, mask), images)
    sq = (_dense_brute_force(g, SHAPE, None) - images[:, 0]) ** 2
    hidden = _hidden_voxels(mask)
    torch.testing.assert_close(loss, sq[hidden].mean() + weight * sq[~hidden].mean(), rtol=1e-12, atol=1e-14)


def test_visible_weight_of_the_patch_loss_counts_visible_patches():
    mask = _mask(seed=9)
    images = torch.rand(2, 1, *SHAPE, dtype=torch.float64)
    pred = torch.randn(2, math.prod(GRID), math.prod(PATCH), dtype=torch.float64, requires_grad=True)
    out = _voxel_output(pred, mask)
    target = torch.stack([torch.stack([
        images[b, 0, gd * 3:(gd + 1) * 3, gh * 2:(gh + 1) * 2, gw * 4:(gw + 1) * 4].reshape(-1)
        for gd in range(GRID[0]) for gh in range(GRID[1]) for gw in range(GRID[2])]) for b in range(2)])
    per_patch = ((pred - target) ** 2).mean(-1)
    loss = MaskedPatchLoss(visible_weight=0.25)(out, images)
    torch.testing.assert_close(loss, per_patch[mask].mean() + 0.25 * per_patch[~mask].mean(), rtol=1e-12, atol=1e-14)
    (grad,) = torch.autograd.grad(loss, pred)
    assert grad.abs().min() > 0  # every patch counts now


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "1", True])
def test_bad_visible_weight_raises_naming_it(bad):
    for loss in (MaskedGaussianLoss, MaskedPatchLoss):
        with pytest.raises(ValueError, match="visible_weight"):
            loss(visible_weight=bad)
