"""Zero-shot decoder initialisation: frame round trip against float64 brute force, resampling against a blob's
world position, overlap de-duplication, empty windows, checkpoint handling, unmasked forward, a real tiny model."""

import math
import warnings

import pytest
import torch
import yaml

from medgauss.gaussians import Gaussians
from medgauss.geometry import ConeBeamGeometry
from medgauss.nets import GaussianMAE, GaussianMAEOutput, VoxelMAE
from medgauss.recon.gaussian.decoder_init import (
    DecoderPreprocessing,
    decoder_preprocessing,
    init_from_decoder,
    load_decoder,
)

TINY = dict(img_size=16, patch_size=8, hidden_size=32, num_layers=1, num_heads=4, mlp_dim=64, decoder_dim=32,
            decoder_depth=1, decoder_heads=4, num_queries=8)
S = 16  # window edge (img_size)
PIX = 2.0
PRE = DecoderPreprocessing(pixdim=PIX, a_min=-1000.0, a_max=1000.0)
HU_WINDOW = (-1000.0, 2000.0)
# array axes (D, H, W) -> world (x, y, z): world = P @ (d, h, w)
P = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)


def geometry(vol_shape=(12, 20, 16), vol_spacing=(2.5, 2.0, 2.0), vol_offset=(3.0, -4.0, 5.0)):
    return ConeBeamGeometry(dso=1000.0, dsd=1500.0, det_shape=(16, 16), det_spacing=(6.0, 6.0),
                            vol_shape=vol_shape, vol_spacing=vol_spacing,
                            angles=torch.linspace(0, math.pi, 4), vol_offset=vol_offset)


def box(geo):
    corners = geo.volume_corners()
    return corners.min(dim=0).values, corners.max(dim=0).values


def output(gaussians: Gaussians, b: int) -> GaussianMAEOutput:
    length = 8
    ids = torch.arange(length).expand(b, length)
    return GaussianMAEOutput(gaussians, torch.zeros(b, length, dtype=torch.bool), ids, ids, (2, 2, 2), (8, 8, 8),
                             (gaussians.num_gaussians,))


class FixedMAE(GaussianMAE):
    """Test double: every window gets the same Gaussians at known normalised points."""

    def __init__(self, points, scale=(0.02, 0.03, 0.05), intensity=0.6, quat=(0.9, 0.1, -0.3, 0.2)):
        super().__init__(**TINY)
        self.points = torch.as_tensor(points, dtype=torch.float32).reshape(-1, 3)
        self.scale = torch.tensor(scale, dtype=torch.float32)
        self.intensity = float(intensity)
        self.quat = torch.tensor(quat, dtype=torch.float32)
        self.calls: list[tuple[int, float | None]] = []

    def forward(self, images, noise=None, mask_ratio=None):
        self.calls.append((images.shape[0], mask_ratio))
        b, n = images.shape[0], self.points.shape[0]
        g = Gaussians(self.points.expand(b, n, 3).clone(), self.scale.expand(b, n, 3).clone(),
                      self.quat.expand(b, n, 4).clone(), torch.full((b, n), self.intensity))
        return output(g, b)


class EchoMAE(GaussianMAE):
    """Test double: one Gaussian at the centroid of each window's content, peak = the window's maximum."""

    def __init__(self):
        super().__init__(**TINY)

    def forward(self, images, noise=None, mask_ratio=None):
        b = images.shape[0]
        x = images[:, 0].double()
        axes = [(torch.arange(n, dtype=torch.float64) + 0.5) / n for n in x.shape[1:]]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)  # [D, H, W, 3] normalised
        w = x / x.sum(dim=(1, 2, 3), keepdim=True)
        means = (w[..., None] * grid).sum(dim=(1, 2, 3))[:, None].float()
        g = Gaussians(means, torch.full((b, 1, 3), 0.05), torch.tensor([1.0, 0, 0, 0]).expand(b, 1, 4).clone(),
                      x.amax(dim=(1, 2, 3))[:, None].float())
        return output(g, b)


def resampled_world(geo, index):
    """Brute force: world (x, y, z) of continuous resampled-grid index (d, h, w) (float64): a pixdim grid of
    ceil(n s / pixdim) voxels centred on the volume box, axes shorter than a window padded on both sides."""
    zyx = []
    for a in range(3):
        n = math.ceil(geo.vol_shape[a] * geo.vol_spacing[a] / PIX)
        before = max(0, (S - n) // 2)
        origin = geo.vol_offset[a] - (n - 1) / 2 * PIX
        zyx.append(origin + (index[a] - before) * PIX)
    return torch.tensor(zyx[::-1], dtype=torch.float64)


def phantom(geo, value=0.35):
    """Water-like ellipsoid (volume units) in air on the geometry's grid, [1, 1, D, H, W]."""
    axes = [(torch.arange(n, dtype=torch.float64) - (n - 1) / 2) * s for n, s in zip(geo.vol_shape, geo.vol_spacing)]
    z, y, x = torch.meshgrid(*axes, indexing="ij")
    inside = (z / 12) ** 2 + (y / 15) ** 2 + (x / 13) ** 2 <= 1
    return (inside * value).float()[None, None]


def write_run(root, model=None, dataset=None):
    """A pretraining run directory: config.yaml + model/ export."""
    root.mkdir(parents=True, exist_ok=True)
    ds = dict(pixdim=PIX, a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True, spatial_size=S)
    ds.update(dataset or {})
    (root / "config.yaml").write_text(yaml.safe_dump({"model": {"img_size": S}, "data": {"dataset": ds}}))
    if model is not None:
        model.save_pretrained(root / "model")
    return root


# ------------------------------------------------------------------------------------------ frame round trip
@pytest.mark.parametrize("window, expect_warning", [((-1000.0, 1000.0), False), ((-175.0, 250.0), True)])
def test_frame_round_trip_against_brute_force(window, expect_warning):
    geo = geometry()
    voxel = (3, 7, 6)  # every window's Gaussian sits at the centre of this voxel of the window
    scale_norm = torch.tensor([0.02, 0.03, 0.05], dtype=torch.float64)
    quat = torch.tensor([0.9, 0.1, -0.3, 0.2], dtype=torch.float64)
    model = FixedMAE([[(i + 0.5) / S for i in voxel]], scale=tuple(scale_norm.tolist()), quat=tuple(quat.tolist()))
    pre = DecoderPreprocessing(pixdim=PIX, a_min=window[0], a_max=window[1])
    volume = phantom(geo)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g = init_from_decoder(volume, geo, model, preprocessing=pre, volume_hu_window=HU_WINDOW)
    lost = [w for w in caught if "lacks" in str(w.message)]
    assert len(lost) == (1 if expect_warning else 0)
    if expect_warning:
        assert "825" in str(lost[0].message)  # (-175 - -1000) HU lost above a_min
    assert all(call[1] == 0.0 for call in model.calls)

    # resampled grid 15 x 20 x 16 (D padded to 16 before index 0 -> none, after -> 1); H windows start at 0, 4
    # (cores split at 10): the voxel at h = 7 is owned by window 0 (7.5 < 10) and, at 4 + 7, by window 1.
    expected = torch.stack([resampled_world(geo, [voxel[0], h, voxel[2]]) for h in (voxel[1], 4 + voxel[1])])
    assert g.means.dtype == torch.float32 and g.linear_map is None
    assert g.means.shape == (1, 2, 3)
    order = torch.argsort(g.means[0, :, 1])
    torch.testing.assert_close(g.means[0, order].double(), expected, atol=1e-4, rtol=0)
    # world axis a has length scale_norm * S * pixdim (component a along array axis a -> world P @)
    sigma_norm = Gaussians(torch.zeros(1, 1, 3, dtype=torch.float64), scale_norm[None, None],
                           quat[None, None], torch.ones(1, 1, dtype=torch.float64)).covariance()[0, 0]
    m = S * PIX * P
    cov = (m @ sigma_norm @ m.T).expand(2, 3, 3)
    torch.testing.assert_close(g.covariance()[0].double(), cov, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.scales[0].double().sort(dim=-1).values,
                               (scale_norm * S * PIX).sort().values.expand(2, 3), rtol=1e-5, atol=0)
    # intensity: w (a_max - a_min) / ((b_max - b_min) (hu_max - hu_min))
    hand = 0.6 * (window[1] - window[0]) / (1.0 * 3000.0)
    torch.testing.assert_close(g.intensities, torch.full((1, 2), hand), rtol=1e-6, atol=0)


def test_intensity_offset_from_b_min_warns():
    geo = geometry()
    model = FixedMAE([[0.5, 0.5, 0.5]])
    pre = DecoderPreprocessing(pixdim=PIX, a_min=-1000.0, a_max=1000.0, b_min=0.2, b_max=0.7)
    with pytest.warns(UserWarning, match="lacks"):
        g = init_from_decoder(phantom(geo), geo, model, preprocessing=pre, min_window_mean=0.0)
    # HU = a_min + (w - b_min) / 0.5 * 2000: only the linear part w * 2000 / (0.5 * 3000) is carried
    torch.testing.assert_close(g.intensities, torch.full_like(g.intensities, 0.6 * 2000 / 1500), rtol=1e-6, atol=0)


def test_resampling_puts_a_blob_at_its_world_position():
    # Independent of grid conventions: a smooth blob at a known world point; the echo model puts one Gaussian
    # at the centroid of each window's content. Single window (15 x 16 x 14 resampled, padded to 16^3).
    geo = geometry(vol_shape=(12, 16, 14), vol_spacing=(2.5, 2.0, 2.0), vol_offset=(3.0, -4.0, 5.0))
    centre = torch.tensor([5.0 + 3.0, -4.0 - 3.0, 3.0 + 2.0], dtype=torch.float64)  # world (x, y, z)
    d, h, w = (torch.arange(n, dtype=torch.float64) for n in geo.vol_shape)
    vox = torch.stack(torch.meshgrid(d, h, w, indexing="ij"), -1)
    world = vox @ geo.volume_affine[:3, :3].T + geo.volume_affine[:3, 3]
    blob = 0.4 * torch.exp(-0.5 * ((world - centre) ** 2).sum(-1) / 2.5**2)  # 0.4 = 200 HU above air
    g = init_from_decoder(blob.float()[None, None], geo, EchoMAE(), preprocessing=PRE, min_window_mean=0.0)
    assert g.num_gaussians == 1
    torch.testing.assert_close(g.means[0, 0].double(), centre, atol=0.1, rtol=0)
    # peak of the resampled blob (<= 0.4 volume units = 0.6 normalised), carried back: <= 0.4, close to it
    assert 0.3 < float(g.intensities) <= 0.4 + 1e-6


# ------------------------------------------------------------------------------------------ overlaps, empties
@pytest.mark.parametrize("stride", [None, 2, 5])
def test_overlapping_windows_keep_each_gaussian_once(stride):
    geo = geometry()  # H: 20 resampled voxels, windows of 16 overlap
    # a Gaussian at every voxel centre of the window's H line (d = 4, w = 8)
    points = [[(4 + 0.5) / S, (i + 0.5) / S, (8 + 0.5) / S] for i in range(S)]
    model = FixedMAE(points)
    g = init_from_decoder(phantom(geo), geo, model, preprocessing=PRE, stride=stride)
    expected = torch.stack([resampled_world(geo, [4, i, 8]) for i in range(20)])  # each grid voxel once
    order = torch.argsort(g.means[0, :, 1])
    assert g.num_gaussians == 20
    torch.testing.assert_close(g.means[0, order].double(), expected, atol=1e-4, rtol=0)


def test_gaussians_outside_the_volume_box_are_dropped():
    geo = geometry(vol_shape=(12, 16, 14))  # W: 14 resampled voxels padded to 16, one air voxel per side
    points = [[0.5, 0.5, (i + 0.5) / S] for i in range(S)]
    g = init_from_decoder(phantom(geo), geo, FixedMAE(points), preprocessing=PRE)
    lo, hi = box(geo)
    assert g.num_gaussians == 14
    assert bool(((g.means[0].double() >= lo) & (g.means[0].double() <= hi)).all())
    expected = torch.stack([resampled_world(geo, [7.5, 7.5, i]) for i in range(1, 15)])  # padded-grid index
    order = torch.argsort(g.means[0, :, 0])
    torch.testing.assert_close(g.means[0, order].double(), expected, atol=1e-4, rtol=0)


def test_empty_windows_are_skipped_and_all_empty_raises():
    geo = geometry(vol_shape=(12, 40, 16))  # H: 40 resampled voxels -> windows at 0, 16, 24
    volume = torch.zeros(1, 1, *geo.vol_shape)
    volume[..., 2:10, 3:9, 4:12] = 0.5  # content only in the first H window
    model = FixedMAE([[0.5, 0.5, 0.5]])
    g = init_from_decoder(volume, geo, model, preprocessing=PRE)
    assert sum(b for b, _ in model.calls) == 1 and g.num_gaussians == 1
    model.calls.clear()
    init_from_decoder(volume, geo, model, preprocessing=PRE, min_window_mean=0.0, batch_size=2)
    assert [b for b, _ in model.calls] == [2, 1]
    with pytest.raises(ValueError, match="no window of the volume contains anything above"):
        init_from_decoder(torch.zeros(1, 1, *geo.vol_shape), geo, model, preprocessing=PRE)


# ------------------------------------------------------------------------------------------ checkpoints
def test_preprocessing_and_decoder_load_from_run_or_model_dir(tmp_path):
    torch.manual_seed(0)
    model = GaussianMAE(**TINY)
    run = write_run(tmp_path / "run", model, dataset={"pixdim": [1.5, 1.5, 1.5], "a_min": -175, "a_max": 250})
    expected = DecoderPreprocessing(pixdim=1.5, a_min=-175.0, a_max=250.0, b_min=0.0, b_max=1.0)
    for folder in (run, run / "model"):
        assert decoder_preprocessing(folder) == expected
        loaded, pre = load_decoder(str(folder))
        assert pre == expected and isinstance(loaded, GaussianMAE) and not loaded.training
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value)


def test_checkpoint_errors(tmp_path):
    voxel = VoxelMAE(img_size=16, patch_size=8, hidden_size=32, num_layers=1, num_heads=4, mlp_dim=64,
                     decoder_dim=32, decoder_depth=1, decoder_heads=4)
    run = write_run(tmp_path / "vmae", voxel)
    with pytest.raises(ValueError, match=r"vmae.*VoxelMAE"):
        load_decoder(run)
    geo = geometry()
    with pytest.raises(ValueError, match="VoxelMAE"):
        init_from_decoder(phantom(geo), geo, run / "model")
    with pytest.raises(ValueError, match="VoxelMAE"):
        init_from_decoder(phantom(geo), geo, voxel, preprocessing=PRE)
    bare = tmp_path / "bare"
    GaussianMAE(**TINY).save_pretrained(bare / "model")
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        load_decoder(bare / "model")
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        decoder_preprocessing(tmp_path / "missing")
    (bare / "config.yaml").write_text("data: [unclosed")
    with pytest.raises(ValueError, match="config.yaml"):
        decoder_preprocessing(bare / "model")
    (bare / "config.yaml").write_text(yaml.safe_dump({"data": {"dataset": {"pixdim": 1.5, "a_min": -175}}}))
    with pytest.raises(ValueError, match=r"config.yaml lacks data.dataset.a_max"):
        decoder_preprocessing(bare)
    with pytest.raises(FileNotFoundError, match="no model export"):
        load_decoder(write_run(tmp_path / "unfinished"))


def test_argument_errors():
    geo = geometry()
    model = FixedMAE([[0.5, 0.5, 0.5]])
    vol = phantom(geo)
    cases = [
        (dict(volume=vol[0]), "volume must have shape"),
        (dict(volume=torch.full_like(vol, float("nan"))), "non-finite"),
        (dict(volume_hu_window=(100.0, 100.0)), "volume_hu_window"),
        (dict(stride=0), "stride"),
        (dict(stride=17), "stride"),
        (dict(batch_size=0), "batch_size"),
        (dict(preprocessing=None), "preprocessing"),
    ]
    for change, message in cases:
        kwargs = dict(volume=vol, geometry=geo, model=model, preprocessing=PRE) | change
        with pytest.raises(ValueError, match=message):
            init_from_decoder(**kwargs)
    with pytest.raises(ValueError, match="a_min < a_max"):
        DecoderPreprocessing(pixdim=1.5, a_min=10.0, a_max=10.0)


# ------------------------------------------------------------------------------------------ real tiny model
def test_forward_without_masking_and_default_unchanged():
    torch.manual_seed(0)
    model = GaussianMAE(**TINY).eval()
    x = torch.rand(2, 1, 16, 16, 16)
    length = model.encoder.num_patches
    out = model(x, mask_ratio=0.0)
    assert out.mask.shape == (2, length) and not bool(out.mask.any())
    assert torch.equal(out.ids_keep, torch.arange(length).expand(2, length))
    # the patch order does not matter without masking
    shuffled = model(x, noise=torch.rand(2, length), mask_ratio=0.0)
    torch.testing.assert_close(shuffled.gaussians.means, out.gaussians.means, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shuffled.gaussians.intensities, out.gaussians.intensities, atol=1e-5, rtol=1e-5)
    # default: the model's ratio with random noise, exactly as noise drawn the same way
    torch.manual_seed(1)
    default = model(x)
    torch.manual_seed(1)
    explicit = model(x, noise=torch.rand(2, length))
    torch.manual_seed(1)
    same_ratio = model(x, mask_ratio=0.75)
    for other in (explicit, same_ratio):
        assert torch.equal(default.mask, other.mask)
        assert torch.equal(default.gaussians.means, other.gaussians.means)
    assert int(default.mask.sum(dim=1)[0]) == round(0.75 * length)
    with pytest.raises(ValueError, match="mask_ratio"):
        model(x, mask_ratio=1.0)


def test_real_tiny_model_end_to_end(tmp_path):
    torch.manual_seed(0)
    geo = geometry()
    run = write_run(tmp_path / "run", GaussianMAE(**TINY, children_per_level=(2,)))
    model = load_decoder(run)[0]
    model.train()
    g = init_from_decoder(phantom(geo), geo, run / "model", stride=8)
    lo, hi = box(geo)
    assert g.num_gaussians > 0 and g.means.dtype == torch.float32 and g.linear_map is None
    for t in (g.means, g.scales, g.quats, g.intensities):
        assert bool(torch.isfinite(t).all())
    assert bool(((g.means[0].double() >= lo) & (g.means[0].double() <= hi)).all())
    assert bool((g.scales > 0).all())
    # the same module passed directly is put in eval mode for the call and restored afterwards
    g2 = init_from_decoder(phantom(geo), geo, model, preprocessing=decoder_preprocessing(run), stride=8)
    assert model.training
    torch.testing.assert_close(g2.means, g.means)
