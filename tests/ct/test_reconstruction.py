"""FDK / FBP accuracy from many views; SART and ASD-POCS beat FDK at 10 views; filters and weights."""

import math

import pytest
import torch

from medgauss.ct import (
    ProjectionNoise,
    angular_weights,
    asd_pocs,
    fdk,
    filter_projections,
    ramp_filter,
    sart,
    simulate_projections,
)
from medgauss.geometry import ConeBeamGeometry, ParallelBeamGeometry
from tests.ct.phantoms import analytic_projection, voxelise


def psnr_db(rec, ref):
    """Independent float64 PSNR with the phantom's own range."""
    ref = ref.double()
    mse = (rec.double() - ref).pow(2).mean()
    return float(10 * torch.log10((ref.max() - ref.min()) ** 2 / mse))


def make_geometry(kind, views, vol_shape=(40, 48, 48), det_shape=(48, 64)):
    common = dict(
        det_shape=det_shape,
        det_spacing=(1.5, 1.5),
        vol_shape=vol_shape,
        vol_spacing=(1.0, 1.0, 1.0),
        angles=torch.arange(views) * 2 * math.pi / views,
    )
    if kind == "cone":
        return ConeBeamGeometry(dso=200.0, dsd=300.0, **common)
    return ParallelBeamGeometry(**common)


@pytest.mark.parametrize("kind", ["cone", "parallel"])
def test_fdk_from_many_views_reaches_stated_psnr(kind):
    # Stated accuracy: 90 exact views of the 3-ellipsoid phantom on a 1.5 mm grid, Ram-Lak filter, with
    # volume and detector offsets: >= 36 dB over the central slab (cone FDK and parallel FBP), mean
    # attenuation within 1 %.
    common = dict(
        det_shape=(40, 72),
        det_spacing=(1.25, 1.25),
        vol_shape=(24, 32, 32),
        vol_spacing=(1.5, 1.5, 1.5),
        angles=torch.arange(90) * 2 * math.pi / 90,
        vol_offset=(3.0, -4.0, 5.0),
        det_offset=(2.0, -3.0),
    )
    geo = ConeBeamGeometry(dso=200.0, dsd=300.0, **common) if kind == "cone" else ParallelBeamGeometry(**common)
    vol = voxelise(geo)
    o, d = geo.rays(dtype=torch.float64)
    rec = fdk(analytic_projection(o, d)[None].float(), geo)
    assert rec.shape == (1, 1, 24, 32, 32) and rec.dtype == torch.float32
    assert psnr_db(rec[:, :, 4:-4], vol[:, :, 4:-4]) > 36.0
    assert abs(float(rec[:, :, 4:-4].mean() / vol[:, :, 4:-4].mean()) - 1) < 0.01


def test_iterative_methods_beat_fdk_at_10_views():
    # 1.5 mm voxels so the whole phantom lies inside a small volume (consistent data for SART)
    geo = ConeBeamGeometry(
        dso=200.0,
        dsd=300.0,
        det_shape=(36, 48),
        det_spacing=(1.5, 1.5),
        vol_shape=(24, 32, 32),
        vol_spacing=(1.5, 1.5, 1.5),
        angles=torch.arange(10) * 2 * math.pi / 10,
    )
    vol = voxelise(geo)
    o, d = geo.rays(dtype=torch.float64)
    proj = analytic_projection(o, d)[None].float()
    ref = vol[:, :, 4:-4]
    scores = {
        "fdk": psnr_db(fdk(proj, geo)[:, :, 4:-4], ref),
        "sart": psnr_db(sart(proj, geo, iterations=5, progress=False)[:, :, 4:-4], ref),
        "asd_pocs": psnr_db(asd_pocs(proj, geo, iterations=5, tv_iterations=10, progress=False)[:, :, 4:-4], ref),
    }
    assert scores["sart"] > scores["fdk"] + 3.0, scores
    assert scores["asd_pocs"] > scores["fdk"] + 3.0, scores


def test_sart_respects_nonnegativity_and_initial():
    geo = make_geometry("parallel", 4, vol_shape=(4, 12, 12), det_shape=(6, 20))
    proj = -torch.rand(1, *geo.output_shape())  # inconsistent negative data
    rec = sart(proj, geo, iterations=2, progress=False)
    assert float(rec.min()) >= 0.0
    with pytest.raises(ValueError, match="initial must have shape"):
        sart(proj, geo, initial=torch.zeros(1, 1, 4, 12, 11), progress=False)
    with pytest.raises(ValueError, match="relaxation"):
        sart(proj, geo, relaxation=2.5, progress=False)
    with pytest.raises(ValueError, match=r"projections must have shape \[B, 4, 6, 20\]"):
        fdk(torch.zeros(1, 4, 6, 19), geo)


def test_ramp_filter_matches_continuous_ramp_and_windows():
    tau = 0.5
    h = ramp_filter(64, tau)
    nu = torch.fft.fftfreq(h.numel(), d=tau, dtype=torch.float64)  # cycles per mm
    # band-limited discrete ramp: close to |nu| away from DC, positive small DC term
    mid = (nu.abs() > 0.05) & (nu.abs() < 0.8 / (2 * tau))
    torch.testing.assert_close(h[mid], nu.abs()[mid], rtol=0.05, atol=0.0)
    assert 0 < float(h[0]) < float(nu[1])
    hann = ramp_filter(64, tau, "hann")
    assert float(hann[h.numel() // 2].abs()) < 1e-12  # zero at Nyquist
    with pytest.raises(ValueError, match="window"):
        ramp_filter(64, tau, "blackman")


def test_angular_weights():
    full = angular_weights(torch.arange(8) * 2 * math.pi / 8)
    torch.testing.assert_close(full, torch.full((8,), math.pi / 8, dtype=torch.float64))
    half = angular_weights(torch.arange(6) * math.pi / 6)
    torch.testing.assert_close(half, torch.full((6,), math.pi / 6, dtype=torch.float64))
    assert abs(float(angular_weights(torch.tensor([2.0, 0.1, 1.0, 3.0])).sum()) - math.pi) < 1e-12


@pytest.mark.parametrize("kind", ["cone", "parallel"])
def test_fdk_refuses_views_that_span_no_arc(kind):
    geo = make_geometry(kind, 3, vol_shape=(4, 12, 12), det_shape=(6, 20)).replace(angles=[0.7, 0.7, 0.7])
    with pytest.raises(ValueError, match=r"geometry\.angles holds 3 views at the same angle"):
        fdk(torch.ones(1, 3, 6, 20), geo)
    with pytest.raises(ValueError, match="angles holds 2 views"):
        angular_weights(torch.tensor([1.5, 1.5], dtype=torch.float64))
    # one view, or a repeated angle inside a real arc, still has a quadrature (shares sum to pi)
    assert angular_weights(torch.tensor([0.3])).tolist() == [math.pi]
    weights = angular_weights(torch.tensor([0.0, 0.0, 1.0, 2.0], dtype=torch.float64))
    assert bool(torch.isfinite(weights).all()) and abs(float(weights.sum()) - math.pi) < 1e-12


@pytest.mark.parametrize("kind", ["cone", "parallel"])
def test_empty_batch_gives_empty_reconstructions_with_gradients(kind):
    geo = make_geometry(kind, 4, vol_shape=(4, 12, 12), det_shape=(6, 20))
    for dtype in (torch.float32, torch.float64):
        proj = torch.zeros(0, *geo.output_shape(), dtype=dtype, requires_grad=True)
        outputs = {
            "filter_projections": filter_projections(proj, geo),
            "fdk": fdk(proj, geo),
            "sart": sart(proj, geo, iterations=2, progress=False),
            "sart_initial": sart(proj, geo, iterations=2, initial=torch.zeros(0, 1, 4, 12, 12), progress=False),
            "asd_pocs": asd_pocs(proj, geo, iterations=2, progress=False),
        }
        for name, out in outputs.items():
            want = proj.shape if name == "filter_projections" else (0, 1, 4, 12, 12)
            assert out.shape == want and out.dtype == dtype, name
            (grad,) = torch.autograd.grad(out.sum(), proj)
            assert grad.shape == proj.shape, name
        hu = torch.zeros(0, 1, 4, 12, 12, dtype=dtype, requires_grad=True)
        sim = simulate_projections(hu, geo, noise=ProjectionNoise(photons=1e3))
        assert sim.shape == (0, *geo.output_shape()) and sim.dtype == dtype
        assert torch.autograd.grad(sim.sum(), hu)[0].shape == hu.shape
    # the other arguments are still checked on an empty batch
    with pytest.raises(ValueError, match="window"):
        fdk(torch.zeros(0, *geo.output_shape()), geo, window="blackman")
    with pytest.raises(ValueError, match="num_subsets"):
        sart(torch.zeros(0, *geo.output_shape()), geo, num_subsets=9, progress=False)
    with pytest.raises(ValueError, match=r"projections must have shape"):
        fdk(torch.zeros(0, 4, 6, 19), geo)


@pytest.mark.parametrize("method", ["fdk", "sart", "asd_pocs", "forward_project"])
def test_non_finite_inputs_are_refused_naming_the_argument(method):
    from medgauss.ct import forward_project

    geo = make_geometry("cone", 4, vol_shape=(4, 12, 12), det_shape=(6, 20))
    if method == "forward_project":
        volume = torch.zeros(1, 1, 4, 12, 12)
        volume[0, 0, 1, 2, 3] = float("nan")
        with pytest.raises(ValueError, match="volume contains non-finite"):
            forward_project(volume, geo)
        return
    projections = torch.zeros(1, 4, 6, 20)
    projections[0, 2, 3, 4] = float("inf")
    fn = {"fdk": fdk, "sart": sart, "asd_pocs": asd_pocs}[method]
    with pytest.raises(ValueError, match="projections contains non-finite"):
        fn(projections, geo)
