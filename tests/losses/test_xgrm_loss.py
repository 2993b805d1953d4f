"""XGRMLoss: the volume term against a hand crop, the render term against the voxel projector of the same box,
gradients (float64 gradcheck), the sub-box geometry of both sides, view selection and errors."""

import math

import numpy as np
import pytest
import torch

from medgauss.ct import forward_project
from medgauss.gaussians import Gaussians
from medgauss.geometry import ConeBeamGeometry
from medgauss.losses import XGRMLoss, box_line_integral_range, shadow_window
from medgauss.metrics import projection_ssim
from medgauss.nets import XGRMOutput, subvolume_geometry
from medgauss.nets.voxgs import UNIT_MASS_SCALE, box_affine, voxel_centres
from medgauss.render import project

N = 16  # grid edge (voxels)
BOX = (8, 8, 8)


def cone(num_views=8, n=N, det=32, spacing=2.0, det_spacing=1.5, **changes) -> ConeBeamGeometry:
    """Detector pixels of half a voxel at the isocentre (1.5 mm * 300 / 450 = 1 mm for 2 mm voxels), as in the
    CPU training data (2.25 mm pixels at the isocentre for 4.5 mm voxels)."""
    fields = dict(dso=300.0, dsd=450.0, det_shape=(det, det), det_spacing=(det_spacing, det_spacing),
                  vol_shape=(n, n, n), vol_spacing=(spacing,) * 3,
                  angles=torch.arange(num_views, dtype=torch.float64) * 2 * math.pi / num_views + 0.1)
    fields.update(changes)
    return ConeBeamGeometry(**fields)


def smooth_volume(n=N, seed=0, blobs=6) -> torch.Tensor:
    """``[1, 1, n, n, n]`` sum of Gaussian blobs (sigma 1.5-4 voxels), values in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64)] * 3, indexing="ij"), dim=-1)
    v = torch.zeros(n, n, n, dtype=torch.float64)
    for _ in range(blobs):
        c = torch.rand(3, generator=g, dtype=torch.float64) * n
        s = 1.5 + 2.5 * torch.rand((), generator=g, dtype=torch.float64)
        v += (0.2 + 0.6 * torch.rand((), generator=g, dtype=torch.float64)) * torch.exp(
            -((idx - c) ** 2).sum(-1) / (2 * s * s))
    return v.clamp(max=1.0)[None, None].float()


def crop(volume, start, size):
    (d, h, w), (a, b, c) = start, size
    return volume[..., d: d + a, h: h + b, w: w + c]


def voxgs_output(geometry, start, size, intensities, dtype=torch.float32) -> XGRMOutput:
    """What the VoxGS decoder gives at its initial scale: one Gaussian per voxel centre of the box, isotropic
    scale UNIT_MASS_SCALE voxels (each holds its voxel's mass), identity rotation, the given opacities."""
    affine = geometry.volume_affine[None]
    start_t = torch.tensor([list(start)])
    means = voxel_centres(affine, start_t, size, dtype=dtype)
    n = means.shape[1]
    voxel_mm = float(torch.linalg.det(affine[0, :3, :3]).abs() ** (1 / 3))
    quats = torch.zeros(1, n, 4, dtype=dtype)
    quats[..., 0] = 1.0
    g = Gaussians(means, torch.full((1, n, 3), UNIT_MASS_SCALE * voxel_mm, dtype=dtype), quats,
                  intensities.reshape(1, n).to(dtype))
    return XGRMOutput(g, g.intensities.reshape(1, 1, *size), start_t, tuple(size), box_affine(affine, start_t))


def gt_output(volume, geometry, start, size=BOX) -> XGRMOutput:
    return voxgs_output(geometry, start, size, crop(volume, start, size))


# ----------------------------------------------------------------------------------------------- volume term


def test_volume_term_is_the_mse_over_the_cropped_box():
    geo = cone()
    gen = torch.Generator().manual_seed(3)
    gt = torch.rand(2, 1, N, N, N, generator=gen)
    starts, size = [(1, 5, 2), (8, 0, 3)], (5, 7, 6)
    outs = [voxgs_output(geo, s, size, torch.rand(math.prod(size), generator=gen)) for s in starts]
    g = Gaussians.cat([o.gaussians for o in outs], dim=0)
    start_t = torch.tensor(starts)
    out = XGRMOutput(g, g.intensities.reshape(2, 1, *size), start_t, size,
                     box_affine(geo.volume_affine[None].expand(2, 4, 4), start_t))
    pred, truth = out.volume.detach().numpy(), gt.numpy()
    hand = np.mean([(pred[b, 0] - truth[b, 0, d: d + 5, h: h + 7, w: w + 6]) ** 2
                    for b, (d, h, w) in enumerate(starts)])
    only_volume = XGRMLoss(lambda_l1=0.0, lambda_ssim=0.0)
    total, parts = only_volume(out, gt, geo)
    assert total.item() == pytest.approx(hand, rel=1e-6)
    assert parts["volume_mse"].item() == pytest.approx(hand, rel=1e-6)
    assert parts["render"].item() == 0.0
    total, parts = XGRMLoss(render_views=2, volume_weight=3.0)(out, gt, geo, [0, 4])
    assert parts["volume_mse"].item() == pytest.approx(hand, rel=1e-6)
    assert total.item() == pytest.approx(3.0 * hand + parts["render"].item(), rel=1e-6)
    assert parts["render"].item() == pytest.approx(
        parts["render_l1"].item() + 0.5 * parts["render_dssim"].item(), rel=1e-6)  # default lambdas 1 and 0.5


# ----------------------------------------------------------------------------------------------- render term

# Tolerance of the render term for a VoxGS that holds the ground truth exactly. The two sides are different
# discretisations of the same volume: Gaussians of sigma = 1/sqrt(2 pi) voxel at the voxel centres (line
# integrals exact) vs the voxel projector's linear interpolation. The Gaussian lattice is not band-limited:
# its projection ripples at the voxel frequency with a relative amplitude of up to 2 exp(-2 pi^2 sigma^2) =
# 2 exp(-pi) = 8.6% per detector axis (in phase with the pixels when they align with the voxels), and the
# voxel projector's blur depends on the view angle. So the bound is that ripple amplitude, 8%, of the mean
# target over the box's shadow; measured on this smooth volume: 3.5-5.3% (D-SSIM 0.003-0.004). Volumes that
# are wrong (flipped, or constant at the right mean) measure 22-56%; the test asks for > 15%.
RELATIVE_L1_TOL = 0.08


@pytest.mark.parametrize("start", [(4, 4, 4), (8, 2, 5), (0, 0, 0)])
def test_render_term_is_near_zero_for_the_voxgs_of_the_ground_truth_and_large_for_a_wrong_volume(start):
    geo, gt = cone(), smooth_volume()
    loss = XGRMLoss(render_views=0)
    good = gt_output(gt, geo, start)
    _, parts = loss(good, gt, geo)
    rendered, target = loss.render_pair(good, gt, geo)
    rows, cols = shadow_window(rendered[0], target[0])
    scale = target[..., rows, cols].abs().mean().item()  # the terms are means over the box's shadow
    assert parts["volume_mse"].item() == 0.0
    assert parts["render_l1"].item() < RELATIVE_L1_TOL * scale
    assert parts["render_dssim"].item() < 0.01
    flipped = crop(gt.flip(2), start, BOX)  # the same values, upside down
    constant = torch.full((math.prod(BOX),), good.volume.mean().item())  # the right mean, no structure
    for wrong in (flipped, constant):
        _, bad = loss(voxgs_output(geo, start, BOX, wrong), gt, geo)
        assert bad["render_l1"].item() > 0.15 * scale
        assert bad["render"].item() > 5 * parts["render"].item()


def test_render_pair_is_project_and_forward_project_of_the_box_through_its_sub_geometry():
    geo, gt = cone(), smooth_volume()
    start = (2, 6, 3)
    out = gt_output(gt, geo, start)
    loss = XGRMLoss(render_views=0, backend="torch")
    views = [1, 6, 3]
    rendered, target = loss.render_pair(out, gt, geo, views)
    box = subvolume_geometry(geo, start, BOX).subset(views)
    r = box_line_integral_range(box)
    assert r == pytest.approx(math.sqrt(3) * 8 * 2.0)
    assert torch.allclose(rendered, project(out.gaussians, box, backend="torch") / r)
    assert torch.allclose(target, forward_project(crop(gt, start, BOX).contiguous(), box, backend="torch") / r)
    # the box's sub-geometry places it where it sits in the full grid: projecting the full grid with
    # everything outside the box zeroed gives the same target
    masked = torch.zeros_like(gt)
    masked[..., 2:10, 6:14, 3:11] = crop(gt, start, BOX)
    full = forward_project(masked, geo.subset(views), backend="torch") / r
    assert torch.allclose(target, full, atol=1e-4 * full.abs().max().item())


def test_shifting_the_box_moves_prediction_and_target_together():
    """A bright blob near the box corner: shifting the box by one voxel along each axis moves the blob's shadow
    on the detector, and it moves by the same amount in the rendered and the target projections."""
    geo = cone(num_views=4)
    idx = torch.stack(torch.meshgrid(*[torch.arange(N, dtype=torch.float64)] * 3, indexing="ij"), dim=-1)
    gt = (0.9 * torch.exp(-((idx - torch.tensor([7.0, 7.5, 8.0])) ** 2).sum(-1) / (2 * 2.0 ** 2)))[None, None].float()
    loss = XGRMLoss(render_views=0)
    cols = torch.arange(32, dtype=torch.float32)

    def centroids(p):  # [V] column and row centroid of each view's shadow
        w = p[0].clamp_min(0)
        return torch.stack(((w.sum(1) * cols).sum(-1) / w.sum((1, 2)), (w.sum(2) * cols).sum(-1) / w.sum((1, 2))))

    base = (3, 3, 3)
    p0, q0 = loss.render_pair(gt_output(gt, geo, base), gt, geo)
    for step in ((1, 0, 0), (0, 1, 0), (0, 0, 1)):
        start = tuple(b + s for b, s in zip(base, step))
        p1, q1 = loss.render_pair(gt_output(gt, geo, start), gt, geo)
        moved_pred, moved_target = centroids(p1) - centroids(p0), centroids(q1) - centroids(q0)
        assert moved_target.abs().max() > 0.1  # the shift changes what the box holds
        assert torch.allclose(moved_pred, moved_target, atol=0.05)  # pixels
    # the Gaussians of one box scored against another box: the model's box_affine no longer matches
    shifted = gt_output(gt, geo, base)
    shifted.box_start[0, 0] += 1
    with pytest.raises(ValueError, match="output.affine"):
        loss(shifted, gt, geo)


# ----------------------------------------------------------------------------------------------- gradients


def test_gradcheck_float64_with_the_torch_backends():
    geo = cone(num_views=2, n=3, det=8, spacing=4.0, det_spacing=3.0)
    gen = torch.Generator().manual_seed(0)
    f64 = torch.float64
    size, start = (2, 2, 2), (1, 0, 1)
    gt = torch.rand(1, 1, 3, 3, 3, generator=gen, dtype=f64)
    base = voxgs_output(geo, start, size, torch.rand(8, generator=gen, dtype=f64), dtype=f64)
    g = base.gaussians
    params = (g.means + 0.3 * torch.randn(g.means.shape, generator=gen, dtype=f64),
              g.scales * (1 + 0.5 * torch.rand(g.scales.shape, generator=gen, dtype=f64)),
              torch.randn(1, 8, 4, generator=gen, dtype=f64),
              g.intensities.clone())
    params = tuple(p.detach().requires_grad_() for p in params)
    loss = XGRMLoss(render_views=1, cutoff=None, backend="torch")

    def f(means, scales, quats, intensities):
        gs = Gaussians(means, scales, quats, intensities)
        out = XGRMOutput(gs, intensities.reshape(1, 1, *size), base.box_start, size, base.affine)
        return loss(out, gt, geo, [0], heldout_views=[1])[0]

    assert f(*params).dtype == f64
    assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-7, rtol=1e-4)


def test_gradients_reach_every_gaussian_parameter_with_the_default_backend():
    geo, gt = cone(), smooth_volume()
    out = gt_output(gt, geo, (4, 4, 4))
    g = out.gaussians
    gen = torch.Generator().manual_seed(2)  # anisotropic and rotated, so that rotations matter
    shape = (g.scales * (1 + torch.rand(g.scales.shape, generator=gen)), torch.randn(g.quats.shape, generator=gen))
    leaves = [t.detach().clone().requires_grad_() for t in (g.means, *shape, g.intensities)]
    gs = Gaussians(*leaves)
    out = XGRMOutput(gs, gs.intensities.reshape(1, 1, *BOX), out.box_start, BOX, out.affine)
    total, _ = XGRMLoss(render_views=2)(out, gt * 0.9, geo, [0, 2, 4], generator=torch.Generator().manual_seed(0))
    total.backward()
    for name, t in zip(("means", "scales", "quats", "intensities"), leaves):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------------------------- views


def test_views_are_the_input_views_then_distinct_held_out_ones():
    geo = cone(num_views=10)
    loss = XGRMLoss(render_views=3)
    table = loss.choose_views([geo, geo], [[0, 5], [2, 7]], generator=torch.Generator().manual_seed(1))
    for row, seen in zip(table, ([0, 5], [2, 7])):
        assert row[:2] == seen and len(row) == 5 and len(set(row)) == 5
    again = loss.choose_views([geo, geo], [[0, 5], [2, 7]], generator=torch.Generator().manual_seed(1))
    assert again == table
    assert loss.choose_views([geo], [1], heldout_views=[4, 2]) == [[1, 4, 2]]
    assert XGRMLoss(render_views=0).choose_views([geo], None) == [list(range(10))]
    # rendered target = SSIM input: the loss's D-SSIM is (1 - projection_ssim) / 2 over those views
    gt = smooth_volume()
    out = gt_output(gt, cone(num_views=10), (4, 4, 4))
    _, parts = loss(out, gt, geo, [0, 5], heldout_views=[1, 2, 3])
    p, q = loss.render_pair(out, gt, geo, [0, 5, 1, 2, 3])
    nonzero = np.nonzero(((p[0] != 0) | (q[0] != 0)).any(0).numpy())  # the box's shadow, by hand
    (r0, r1), (c0, c1) = (nonzero[0].min(), nonzero[0].max() + 1), (nonzero[1].min(), nonzero[1].max() + 1)
    assert (r1 - r0) * (c1 - c0) < 0.8 * p.shape[-1] * p.shape[-2]  # a real crop
    assert parts["render_l1"].item() == pytest.approx((p - q).abs().sum().item() / (5 * (r1 - r0) * (c1 - c0)),
                                                      rel=1e-5)  # no non-zero pixel is left out
    ssim = projection_ssim(p[..., r0:r1, c0:c1], q[..., r0:r1, c0:c1], data_range=1.0).mean().item()
    assert parts["render_dssim"].item() == pytest.approx((1 - ssim) / 2, rel=1e-5)


# ----------------------------------------------------------------------------------------------- errors


def test_bad_inputs_raise_value_errors_naming_them():
    geo, gt = cone(num_views=6), smooth_volume()
    out = gt_output(gt, geo, (4, 4, 4))
    loss = XGRMLoss(render_views=2)
    for kwargs, match in (({"lambda_l1": -1.0}, "lambda_l1"), ({"lambda_ssim": float("nan")}, "lambda_ssim"),
                          ({"render_views": -1}, "render_views"), ({"cutoff": 0.0}, "cutoff"),
                          ({"value_range": 0.0}, "value_range"), ({"ssim_window": 4}, "ssim_window"),
                          ({"backend": "cuda"}, "backend"), ({"volume_weight": -2}, "volume_weight")):
        with pytest.raises(ValueError, match=match):
            XGRMLoss(**kwargs)
    with pytest.raises(ValueError, match="volume"):
        loss(out, gt[..., :-1], geo, [0])  # grid differs from the geometry
    with pytest.raises(ValueError, match="volume"):
        loss(out, gt[0], geo, [0])
    bad = gt.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        loss(out, bad, geo, [0])
    with pytest.raises(ValueError, match="output.volume"):
        loss(XGRMOutput(out.gaussians, out.volume[..., :-1], out.box_start, BOX, out.affine), gt, geo, [0])
    nan_out = gt_output(gt, geo, (4, 4, 4))
    nan_out.volume.view(-1)[3] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        loss(nan_out, gt, geo, [0])
    with pytest.raises(ValueError, match="output must be an XGRMOutput"):
        loss(out.gaussians, gt, geo, [0])
    with pytest.raises(ValueError, match="geometry"):
        loss(out, gt, [geo, geo], [0])  # two geometries for one sample
    with pytest.raises(ValueError, match="input_views"):
        loss(out, gt, geo, [0, 9])
    with pytest.raises(ValueError, match="render_views"):
        loss(out, gt, geo, [0, 1, 2, 3, 4])  # one view left, two asked for
    with pytest.raises(ValueError, match="heldout_views"):
        loss(out, gt, geo, [0, 1], heldout_views=[1, 2])


# ------------------------------------------------------------------------------------------ opacity L1 term


def test_opacity_l1_term_is_lambda_times_the_mean_opacity_of_the_box():
    geo = cone()
    gen = torch.Generator().manual_seed(7)
    gt = torch.rand(1, 1, N, N, N, generator=gen)
    size = (5, 7, 6)
    opacities = torch.rand(math.prod(size), generator=gen, dtype=torch.float64).requires_grad_()
    out = voxgs_output(geo, (2, 3, 1), size, opacities, dtype=torch.float64)
    hand = float(opacities.detach().abs().sum()) / math.prod(size)
    base_total, base_parts = XGRMLoss(lambda_l1=0.0, lambda_ssim=0.0)(out, gt, geo)
    total, parts = XGRMLoss(lambda_l1=0.0, lambda_ssim=0.0, lambda_opacity_l1=0.3)(out, gt, geo)
    assert parts["opacity_l1"].item() == pytest.approx(hand, rel=1e-12)
    assert base_parts["opacity_l1"].item() == pytest.approx(hand, rel=1e-12)  # logged also when unweighted
    assert total.item() == pytest.approx(base_total.item() + 0.3 * hand, rel=1e-12)
    assert parts["total"].item() == pytest.approx(total.item(), rel=1e-12)
    # its gradient: lambda / N on every voxel, on top of the MSE's 2 (v - g) / N
    (grad,) = torch.autograd.grad(total - base_total, opacities)
    torch.testing.assert_close(grad, torch.full_like(grad, 0.3 / math.prod(size)), rtol=1e-12, atol=1e-15)
    # the default (0) adds nothing: the total is the volume term alone
    assert base_total.item() == pytest.approx(base_parts["volume_mse"].item(), rel=1e-12)
    with pytest.raises(ValueError, match="lambda_opacity_l1"):
        XGRMLoss(lambda_opacity_l1=-0.1)
