"""GaussianReconstructor: recovery of known Gaussians, route agreement, density control, exact resume, errors."""

import math

import pytest
import torch

from medgauss.gaussians import Gaussians
from medgauss.geometry import ConeBeamGeometry
from medgauss.metrics import psnr
from medgauss.recon.gaussian.density import DensityControl, GradientStats, density_step
from medgauss.recon.gaussian.params import GaussianParameters, SceneFrame
from medgauss.recon.gaussian.reconstructor import GaussianReconConfig, GaussianReconstructor, splat_world
from medgauss.render.xray import project


def _geometry(n=16, views=24, spacing=(2.0, 2.0, 2.0), offset=(0.0, 0.0, 0.0)) -> ConeBeamGeometry:
    return ConeBeamGeometry(dso=400.0, dsd=600.0, det_shape=(24, 24), det_spacing=(3.0, 3.0), vol_shape=(n, n, n),
                            vol_spacing=spacing, vol_offset=offset,
                            angles=torch.arange(views, dtype=torch.float64) * 2 * math.pi / views)


def _truth(dtype=torch.float32, shift=(0.0, 0.0, 0.0)) -> Gaussians:
    """Three anisotropic, rotated Gaussians well inside a 32 mm box (world x, y, z mm)."""
    means = torch.tensor([[[0.0, 0.0, 0.0], [5.0, -4.0, 3.0], [-6.0, 3.0, -4.0]]], dtype=dtype)
    means = means + torch.tensor(shift, dtype=dtype)
    scales = torch.tensor([[[4.0, 2.5, 3.0], [2.0, 2.0, 2.0], [2.5, 3.5, 2.0]]], dtype=dtype)
    quats = torch.tensor([[[1.0, 0, 0, 0], [0.9, 0.1, 0.2, 0.0], [1.0, 0.0, 0.0, 0.3]]], dtype=dtype)
    return Gaussians(means, scales, quats, torch.tensor([[0.5, 0.8, 0.6]], dtype=dtype))


def _random_start(n: int, dtype=torch.float32, seed=0) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(1, n, 3, generator=g, dtype=dtype) - 0.5) * 24
    return Gaussians(means, torch.full((1, n, 3), 3.0, dtype=dtype), torch.tensor([1.0, 0, 0, 0], dtype=dtype)
                     .expand(1, n, 4), torch.full((1, n), 0.1, dtype=dtype))


def _fast_config(**changes) -> GaussianReconConfig:
    settings = dict(iterations=300, views_per_step=8, lr_means=1e-2, lr_means_final=1e-4, lr_scales=0.01,
                    eval_every=0, density=DensityControl(every=100, start=100))
    settings.update(changes)
    return GaussianReconConfig(**settings)


@pytest.mark.parametrize("route", ["splat", "project"])
def test_recovers_known_gaussians_from_a_random_start(route):
    geometry = _geometry(offset=(2.0, -3.0, 1.0))
    truth = _truth(shift=(1.0, -3.0, 2.0))  # (x, y, z): the offset of the volume is (z, y, x)
    projections = project(truth, geometry)
    reference = splat_world(truth, geometry.vol_shape, geometry.volume_affine)
    rec = GaussianReconstructor(projections, geometry, _random_start(48), _fast_config(route=route),
                                reference=reference, data_range=float(reference.max()))
    history = rec.fit(progress=False)
    assert history[0].iteration == 0 and history[-1].iteration == 300
    assert history[0].psnr < 22
    assert history[-1].psnr > 38, [(r.iteration, r.psnr) for r in history]
    assert rec.route == route


def _centroid(p):
    """Row and column centroids ``[B, V]`` of projection images ``[B, V, rows, cols]``, in pixels."""
    rows = torch.arange(p.shape[-2], dtype=p.dtype)[:, None]
    cols = torch.arange(p.shape[-1], dtype=p.dtype)[None, :]
    mass = p.sum(dim=(2, 3))
    return (p * rows).sum(dim=(2, 3)) / mass, (p * cols).sum(dim=(2, 3)) / mass


def test_routes_render_the_same_projections():
    """Voxelise-then-project and exact line integrals agree: the same mass and centroid in every view, and a
    difference that is the voxel grid's blur (second order: it shrinks ~4x when the spacing halves)."""
    errors = []
    for n, spacing in ((48, 1.0), (96, 0.5)):  # a 48 mm box: every Gaussian's 5-sigma box inside
        geometry = _geometry(n=n, spacing=(spacing,) * 3)
        truth = _truth()
        # cutoff 5: at 3 the two truncate differently (splat: the 3-sigma ellipsoid, 97% of the mass; project:
        # rays within 3 sigma, each integrated whole, 99%)
        rec = GaussianReconstructor(project(truth, geometry), geometry, truth, _fast_config(route="splat", cutoff=5.0))
        with torch.no_grad():
            by_splat = rec.render()
            rec.route = "project"
            by_project = rec.render()
        mass_splat, mass_project = by_splat.sum(dim=(2, 3)), by_project.sum(dim=(2, 3))
        torch.testing.assert_close(mass_splat, mass_project, rtol=3e-3, atol=0)
        for a, b in zip(_centroid(by_splat), _centroid(by_project)):
            assert float((a - b).abs().max()) < 0.01  # pixels
        errors.append(float((by_splat - by_project).norm() / by_project.norm()))
    assert errors[0] < 0.03 and errors[1] < errors[0] / 3, errors


def test_parameters_round_trip_and_their_gradient_matches_finite_differences():
    geometry = _geometry()
    truth = _truth(torch.float64)
    frame = SceneFrame.of(geometry, amplitude=0.8)
    params = GaussianParameters.from_gaussians(truth, frame, torch.float64)
    back = params.gaussians()
    for name in ("means", "scales", "intensities"):
        torch.testing.assert_close(getattr(back, name), getattr(truth, name), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(back.covariance(), truth.covariance(), rtol=1e-10, atol=1e-10)
    small = geometry.replace(det_shape=(6, 6), det_spacing=(10.0, 10.0)).subset([0, 5])

    def render(means, log_scales, quats, raw):
        params.tensors.update(means=means, log_scales=log_scales, quats=quats, raw_intensities=raw)
        return project(params.gaussians(), small, backend="torch", cutoff=None)

    inputs = tuple(params.tensors[k].detach().clone().requires_grad_(True)
                   for k in ("means", "log_scales", "quats", "raw_intensities"))
    assert torch.autograd.gradcheck(render, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def _optimizer(params: GaussianParameters) -> torch.optim.Adam:
    return torch.optim.Adam([{"params": [params.tensors[k]], "name": k, "lr": 1e-3} for k in params.tensors])


def test_clone_keeps_the_volume_and_split_keeps_the_mass():
    geometry = _geometry(n=32, spacing=(1.0, 1.0, 1.0))
    truth = _truth(torch.float64)
    params = GaussianParameters.from_gaussians(truth, SceneFrame.of(geometry, 1.0), torch.float64)
    optimizer = _optimizer(params)
    stats = GradientStats(3, torch.device("cpu"), torch.float64)
    stats.add(torch.tensor([[1.0, 0, 0], [0.0, 0, 0], [0.0, 0, 0]], dtype=torch.float64))  # only the first
    before = splat_world(params.gaussians(), geometry.vol_shape, geometry.volume_affine, cutoff=None)
    # first Gaussian's largest scale is 4 mm = 0.125 of the 32 mm box: a clone below split_scale 0.2
    report = density_step(DensityControl(split_scale=0.2, grad_ratio=1.5), params, optimizer, stats,
                          torch.Generator().manual_seed(0), 1, max_gaussians=10)
    assert (report.cloned, report.split, report.pruned, report.count) == (1, 0, 0, 4)
    after = splat_world(params.gaussians(), geometry.vol_shape, geometry.volume_affine, cutoff=None)
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-12)
    assert all(group["params"][0] is params.tensors[group["name"]] for group in optimizer.param_groups)
    # a split of the same Gaussian (now split_scale below it): mass, the sum of the volume, is kept
    stats = GradientStats(4, torch.device("cpu"), torch.float64)
    stats.add(torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.float64))
    report = density_step(DensityControl(split_scale=0.05, grad_ratio=1.5), params, optimizer, stats,
                          torch.Generator().manual_seed(0), 2, max_gaussians=10)
    assert (report.cloned, report.split, report.count) == (0, 1, 5)
    split = splat_world(params.gaussians(), geometry.vol_shape, geometry.volume_affine, cutoff=None)
    assert float(split.detach().sum()) == pytest.approx(float(before.detach().sum()), rel=2e-3)


def test_density_control_keeps_the_count_bounded_and_prunes():
    geometry = _geometry()
    truth = _truth()
    start = _random_start(40)
    config = _fast_config(iterations=200, density=DensityControl(every=20, start=20, stop=200, grad_ratio=0.5,
                                                                   max_gaussians=50))
    rec = GaussianReconstructor(project(truth, geometry), geometry, start, config)
    counts = []
    rec.fit(progress=False, callback=lambda record, r: counts.append(r.params.count))
    assert rec.density_log and max(r.count for r in rec.density_log) <= 50
    assert sum(r.cloned + r.split for r in rec.density_log) > 0
    # a Gaussian of negligible intensity and one far outside the box are pruned at the next density step
    weak = Gaussians(torch.tensor([[[0.0, 0, 0], [500.0, 0, 0], [3.0, 0, 0]]]), torch.full((1, 3, 3), 3.0),
                     torch.tensor([1.0, 0, 0, 0]).expand(1, 3, 4), torch.tensor([[1.0, 0.5, 1e-6]]))
    rec = GaussianReconstructor(project(truth, geometry), geometry, weak,
                                _fast_config(iterations=1, density=DensityControl(every=1, start=1, stop=1)))
    rec.fit(progress=False)
    assert rec.density_log[0].pruned == 2 and rec.params.count >= 1


def test_resume_is_exact(tmp_path):
    geometry = _geometry()
    truth = _truth(torch.float64)
    projections = project(truth, geometry)
    config = _fast_config(iterations=120, lambda_tv=0.01, tv_box=8, checkpoint_every=60,
                          density=DensityControl(every=30, start=30, stop=120, grad_ratio=1.0))
    straight = GaussianReconstructor(projections, geometry, _random_start(30, torch.float64), config)
    straight.fit(progress=False)
    first = GaussianReconstructor(projections, geometry, _random_start(30, torch.float64), config)
    first.fit(60, checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert (tmp_path / "ckpt" / "gaussians.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic: no temp folder left
    resumed = GaussianReconstructor(projections, geometry, _random_start(30, torch.float64), config)
    resumed.fit(120, checkpoint_dir=tmp_path / "ckpt", progress=False)
    assert resumed.iteration == straight.iteration == 120
    for name, value in straight.params.tensors.items():
        torch.testing.assert_close(resumed.params.tensors[name], value, rtol=0, atol=0)
    assert [r.count for r in resumed.density_log] == [r.count for r in straight.density_log]
    saved = Gaussians.load(tmp_path / "ckpt" / "gaussians.safetensors", device="cpu")
    torch.testing.assert_close(saved.means, resumed.gaussians.means)


def test_volume_on_another_grid_is_the_same_field():
    geometry = _geometry(n=16, spacing=(2.0, 1.5, 1.0), offset=(3.0, 0.0, -2.0))
    truth = _truth()
    rec = GaussianReconstructor(project(truth, geometry), geometry, truth, _fast_config())
    full = rec.volume()
    affine = geometry.volume_affine.clone()
    start = torch.tensor([4.0, 2.0, 6.0], dtype=torch.float64)  # (d, h, w) voxel of the crop's first voxel
    affine[:3, 3] = geometry.volume_affine[:3, :3] @ start + geometry.volume_affine[:3, 3]
    crop = rec.volume((8, 10, 6), affine)
    torch.testing.assert_close(crop, full[..., 4:12, 2:12, 6:12], rtol=1e-4, atol=1e-6)
    assert float(psnr(full, splat_world(truth, geometry.vol_shape, geometry.volume_affine), data_range=1.0)) > 80


def test_errors_name_the_argument(tmp_path):
    geometry = _geometry()
    truth = _truth()
    projections = project(truth, geometry)
    with pytest.raises(ValueError, match="projections must have shape"):
        GaussianReconstructor(projections[:, :5], geometry, truth)
    bad = projections.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        GaussianReconstructor(bad, geometry, truth)
    with pytest.raises(ValueError, match="initial Gaussians"):
        GaussianReconstructor(projections, geometry, truth[:, :0])
    with pytest.raises(ValueError, match="reference must have shape"):
        GaussianReconstructor(projections, geometry, truth, reference=torch.zeros(1, 1, 4, 4, 4))
    with pytest.raises(ValueError, match="route"):
        GaussianReconConfig(route="raster")
    with pytest.raises(ValueError, match="views_per_step"):
        GaussianReconConfig(views_per_step=0)
    with pytest.raises(ValueError, match="density.max_gaussians"):
        DensityControl(max_gaussians=0)
    rec = GaussianReconstructor(projections, geometry, truth)
    with pytest.raises(FileNotFoundError, match="state.pt is missing"):
        rec.load_checkpoint(tmp_path)
    (tmp_path / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read 3DGR checkpoint"):
        rec.load_checkpoint(tmp_path)
